"""orbax save/restore is bit-exact and resumes bit-for-bit; StableEmbed keeps 32-bit state."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from jaxq import optim


def _bits(x):
    x = np.asarray(x)
    return x.view(np.uint8) if x.dtype.itemsize == 1 else x.view(f"u{x.dtype.itemsize}")


def _assert_bit_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(la, lb, strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(_bits(x), _bits(y))


FACTORIES = {
    "adamw_8bit": lambda: optim.adamw_8bit(1e-3, min_quantized_size=1024),
    "adamw_4bit": lambda: optim.adamw_4bit(1e-3, min_quantized_size=1024),
    "adamw_fp8": lambda: optim.adamw_fp8(1e-3, min_quantized_size=1024),
    "lion_8bit": lambda: optim.lion_8bit(1e-4, min_quantized_size=1024),
    "sgd_8bit": lambda: optim.sgd_8bit(1e-2, momentum=0.9, min_quantized_size=1024),
}


@pytest.mark.sweep
def test_orbax_roundtrip_and_resume_every_optimizer(tmp_path):
    key = jax.random.key(0)
    params = {"w": jax.random.normal(key, (32, 384)), "b": jnp.zeros((384,)),
              "v": jax.random.normal(key, (3, 16, 64))}
    txs = {name: f() for name, f in FACTORIES.items()}

    def make_step(tx):
        @jax.jit
        def step(p, s, i):
            g = jax.tree.map(lambda x: jax.random.normal(jax.random.fold_in(key, i), x.shape), p)
            u, s = tx.update(g, s, p)
            return optax.apply_updates(p, u), s

        return step

    steps = {name: make_step(tx) for name, tx in txs.items()}
    run = {}
    for name, tx in txs.items():
        p, s = params, jax.jit(tx.init)(params)
        for i in range(3):
            p, s = steps[name](p, s, i)
        run[name] = {"params": p, "opt": s}
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(tmp_path / "ck", run)
    ckpt.wait_until_finished()
    restored = ckpt.restore(tmp_path / "ck", jax.tree.map(ocp.utils.to_shape_dtype_struct, run))
    ckpt.close()
    _assert_bit_equal(restored, run)
    for name in txs:
        p1, s1 = run[name]["params"], run[name]["opt"]
        p2, s2 = restored[name]["params"], restored[name]["opt"]
        assert type(s2[0]) is type(s1[0])  # NamedTuple states come back as NamedTuples
        for i in range(3, 6):
            p1, s1 = steps[name](p1, s1, i)
            p2, s2 = steps[name](p2, s2, i)
        _assert_bit_equal((p1, s1), (p2, s2))


def test_stable_embed_layer():
    emb = optim.StableEmbed(300, 64, rngs=nnx.Rngs(0))
    table = np.asarray(emb.table)
    bound = np.sqrt(6.0 / (300 + 64))
    assert table.shape == (300, 64) and np.abs(table).max() <= bound
    assert np.abs(table).max() > 0.9 * bound and abs(table.std() - bound / np.sqrt(3)) < 0.01
    ids = jnp.array([[0, 5, 299]])
    y = emb(ids)
    x = table[np.asarray(ids)].astype(np.float64)
    ref = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(np.asarray(y), ref, atol=1e-5)
    half = optim.StableEmbed(300, 64, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    assert half(ids).dtype == jnp.bfloat16
    assert emb.attend(jnp.ones((2, 64))).shape == (2, 300)
    with pytest.raises(TypeError, match="ids"):
        emb(jnp.ones((2,)))
    with pytest.raises(ValueError, match="features"):
        optim.StableEmbed(10, 0, rngs=nnx.Rngs(0))


def test_stable_embed_table_keeps_32bit_state_and_trains():
    class Model(nnx.Module):
        def __init__(self, rngs):
            self.embed = optim.StableEmbed(512, 64, rngs=rngs)
            self.out = nnx.Linear(64, 512, rngs=rngs)

        def __call__(self, ids):
            return self.out(self.embed(ids))

    model = Model(nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    tx = optim.adamw_8bit(1e-2, min_quantized_size=1024)
    state = tx.init(params)
    inner = state[0]
    table_m = jax.tree.leaves(inner.mu["embed"]["stable_embedding"])
    assert [x.dtype for x in table_m] == [jnp.float32]  # 32768 elements, kept in 32 bits
    kernel_m = jax.tree.leaves(inner.mu["out"]["kernel"])
    assert [x.dtype for x in kernel_m] == [jnp.uint8, jnp.bfloat16]  # quantized
    # A user's own keep_fp32 (predicate or mask) adds to the StableEmbed rule.
    mask = jax.tree.map(lambda _: False, params)
    for keep in (lambda path, x: "out/kernel" in path, mask):
        inner = optim.adamw_8bit(1e-2, min_quantized_size=1024, keep_fp32=keep).init(params)[0]
        table_m = jax.tree.leaves(inner.mu["embed"]["stable_embedding"])
        assert [x.dtype for x in table_m] == [jnp.float32]
        kernel_m = jax.tree.leaves(inner.mu["out"]["kernel"])
        want = [jnp.float32] if callable(keep) else [jnp.uint8, jnp.bfloat16]
        assert [x.dtype for x in kernel_m] == want
    ids = jnp.arange(64).reshape(4, 16) % 512

    @jax.jit
    def step(params, state):
        def loss_fn(p):
            logits = nnx.merge(graphdef, p)(ids)
            return optax.softmax_cross_entropy_with_integer_labels(logits, ids).mean()

        loss, g = jax.value_and_grad(loss_fn)(params)
        u, state = tx.update(g, state, params)
        return optax.apply_updates(params, u), state, loss

    losses = []
    for _ in range(20):
        params, state, loss = step(params, state)
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0]
