"""Training helpers: cross-entropy and evaluate against numpy references, the jitted step,
determinism of the fidelity protocol, and that a few steps reduce the loss."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxq import data
from jaxq.models import (
    GPT,
    GPTConfig,
    cross_entropy,
    evaluate,
    make_train_step,
    merge_model,
    split_model,
    train,
)

TINY = GPTConfig(d_model=32, n_heads=2, n_layers=1, seq_len=16)


def _np_ce(logits, targets):
    logits = np.asarray(logits, np.float64)
    m = logits.max(-1, keepdims=True)
    logz = m[..., 0] + np.log(np.exp(logits - m).sum(-1))
    picked = np.take_along_axis(logits, targets[..., None], -1)[..., 0]
    return float(np.mean(logz - picked))


def test_cross_entropy_matches_numpy_and_edge_values():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 5, 256)).astype(np.float32) * 4
    targets = rng.integers(0, 256, (3, 5))
    assert float(cross_entropy(logits, targets)) == pytest.approx(_np_ce(logits, targets), 1e-6)
    # uniform logits: log V exactly; huge logits stay finite
    assert float(cross_entropy(jnp.zeros((2, 256)), jnp.array([0, 255]))) == pytest.approx(
        np.log(256), 1e-6
    )
    big = jnp.array([[1e30, 0.0, -1e30]])
    assert float(cross_entropy(big, jnp.array([0]))) == 0.0
    with pytest.raises(ValueError, match=r"targets must have shape .*\(3, 5\)"):
        cross_entropy(logits, targets[:, :4])


def test_evaluate_matches_reference_windows_and_padding():
    model = GPT(TINY, rngs=nnx.Rngs(0))
    tokens = np.random.default_rng(1).integers(0, 256, 5 * 16 + 7).astype(np.int32)
    # 5 complete windows, batch 2 -> the last batch is padded
    got = evaluate(model, tokens, batch_size=2)
    windows = np.stack([tokens[i * 16:i * 16 + 17] for i in range(5)])
    logits = np.asarray(jax.jit(lambda x: model(x))(windows[:, :-1]))
    assert got == pytest.approx(_np_ce(logits, windows[:, 1:]), rel=1e-5)
    assert evaluate(model, tokens, batch_size=64, max_windows=2) == pytest.approx(
        _np_ce(logits[:2], windows[:2, 1:]), rel=1e-5
    )
    with pytest.raises(ValueError, match="need at least seq_len"):
        evaluate(model, tokens[:16])
    with pytest.raises(ValueError, match="must be 1-D"):
        evaluate(model, tokens.reshape(1, -1))


def test_train_step_matches_manual_update_and_does_not_recompile():
    model = GPT(TINY, rngs=nnx.Rngs(0))
    graphdef, params = split_model(model)
    # Adam's first step is lr * g / (|g| + eps): with a tiny eps it amplifies the rounding
    # of near-zero gradients (which two separately compiled programs may round differently)
    # up to lr; eps = 1e-3 keeps the comparison about the step, not that noise
    opt = optax.adamw(1e-2, eps=1e-3)
    x = jnp.asarray(np.random.default_rng(2).integers(0, 256, (4, 16)), jnp.int32)
    y = jnp.roll(x, -1, axis=1)

    def loss_fn(p):
        return cross_entropy(merge_model(graphdef, p)(x), y)

    loss0, grads = jax.jit(jax.value_and_grad(loss_fn))(params)
    want = jax.jit(
        lambda g, p: optax.apply_updates(p, opt.update(g, opt.init(p), p)[0])
    )(grads, params)

    step = make_train_step(graphdef, opt, donate=False)
    state = opt.init(params)
    new_params, state, loss = step(params, state, x, y)
    assert float(loss) == pytest.approx(float(loss0), rel=1e-6)
    for a, b in zip(jax.tree.leaves(new_params), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    new_params, state, _ = step(new_params, state, x, y)
    assert step._cache_size() == 1  # same shapes and dtypes: no second compilation
    with pytest.raises(TypeError, match="GradientTransformation"):
        make_train_step(graphdef, "adam")


def test_train_reduces_loss_and_is_deterministic():
    tokens = data.load_tokens(max_bytes=200_000)
    kwargs = dict(steps=40, seed=3, corpus=tokens, batch_size=8, eval_windows=64)
    r1 = train(TINY, optax.adamw(1e-2), **kwargs)
    assert r1.losses.shape == (40,) and np.all(np.isfinite(r1.losses))
    assert r1.losses[-5:].mean() < r1.losses[:5].mean() - 1.0  # from ~log(256) = 5.5
    assert r1.val_loss < np.log(256) - 1.0
    _, val = data.split(tokens)
    assert evaluate(r1.model, val, max_windows=64) == pytest.approx(r1.val_loss, rel=1e-6)
    # the fidelity protocol: same seed -> same init and batches -> identical run
    r2 = train(TINY, optax.adamw(1e-2), **{**kwargs, "steps": 3})
    np.testing.assert_array_equal(r2.losses, r1.losses[:3])
    r3 = train(TINY, optax.adamw(1e-2), **{**kwargs, "steps": 3, "seed": 4})
    assert not np.array_equal(r3.losses, r2.losses)


def test_train_input_validation():
    with pytest.raises(ValueError, match="steps and batch_size must be positive"):
        train(TINY, optax.adam(1e-3), steps=0)
    with pytest.raises(ValueError, match="1-D integer array"):
        train(TINY, optax.adam(1e-3), steps=1, corpus=np.zeros((4, 100)))
    with pytest.raises(ValueError, match=r"\(train, val\)"):
        train(TINY, optax.adam(1e-3), steps=1, corpus=(np.zeros(100),))
