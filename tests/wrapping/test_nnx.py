"""jaxq.quantize_model on NNX models that were not written for jaxq."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxq
from jaxq import recipes as R

from .gemma_style import Decoder

TOKENS = jax.random.randint(jax.random.key(0), (2, 17), 0, 256)


def _rel(a, b):
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def _loss(model, tokens):
    logits = model(tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


def test_paths_first_match_and_unused_rules():
    model = Decoder(rngs=nnx.Rngs(0))
    paths = [p for p, _, _ in jaxq.wrapping.layers(model)]
    assert "blocks/attn/q" in paths and "blocks/mlp/down" in paths and "embed" not in paths
    rules = [
        jaxq.Rule(r"blocks/attn/.*", recipe=None),  # attention stays in float
        jaxq.Rule(r"blocks/.*", op="dot_general", recipe=R.FP8Current()),
        jaxq.Rule(r"never/.*", recipe=R.MXFP8()),
    ]
    q = jaxq.quantize_model(model, rules)
    kinds = {p: type(layer).__name__ for p, layer, _ in jaxq.wrapping.layers(q)}
    assert kinds["blocks/attn/q"] == "Einsum" and kinds["blocks/mlp/up"] == "QuantizedLinear"
    assert jaxq.unused_rules(model, rules) == [rules[2]]
    # the original is untouched
    assert type(model.blocks.mlp.up) is nnx.Linear


@pytest.mark.sweep
@pytest.mark.parametrize(
    "recipe",
    [R.FP8Current(), R.FP8Delayed(history_length=8), R.MXFP8(), R.Int8(), R.NVFP4(),
     R.FP8Blockwise(block_size=32)],
    ids=lambda r: r.name,
)
def test_output_differs_by_a_quantization_sized_amount(recipe):
    model = Decoder(rngs=nnx.Rngs(0))
    q = jaxq.quantize_model(model, [jaxq.Rule(".*", recipe=recipe)], key=jax.random.key(1))
    y0, y1 = model(TOKENS), q(TOKENS)
    err = _rel(y1, y0)
    hi = 0.6 if recipe.name in ("nvfp4", "ternary") else 0.15
    assert 1e-3 < err < hi, err
    # float parameters are the same objects' values under the same paths
    p0, p1 = nnx.state(model, nnx.Param), nnx.state(q, nnx.Param)
    assert jax.tree.structure(p0) == jax.tree.structure(p1)
    for a, b in zip(jax.tree.leaves(p0), jax.tree.leaves(p1), strict=True):
        np.testing.assert_array_equal(a, b)


def test_train_step_with_nnx_optimizer_threads_state():
    model = Decoder(rngs=nnx.Rngs(0))
    q = jaxq.quantize_model(model, [jaxq.Rule(".*", recipe=R.FP8Delayed(history_length=4))])
    opt = nnx.Optimizer(q, optax.adamw(1e-3), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, tokens):
        loss, grads = jaxq.wrapping.value_and_grad(_loss)(model, tokens)
        opt.update(model, grads)
        return loss

    losses = [float(step(q, opt, TOKENS)) for _ in range(3)]
    assert np.isfinite(losses).all() and losses[-1] < losses[0]
    hist = q.blocks.mlp.up.jaxq_state.get_value()
    assert hist.lhs_history.shape == (2, 4)  # one history per stacked layer
    assert (np.asarray(hist.lhs_history[:, :3]) > 0).all()
    assert (np.asarray(hist.grad_history[:, :3]) > 0).all()
    assert float(hist.lhs_history[0, 3]) == 0.0
    # the optimizer holds parameters only, never recipe state
    assert not jax.tree.leaves(nnx.state(opt, jaxq.QuantState))


def test_learned_steps_are_params_and_train():
    model = Decoder(rngs=nnx.Rngs(0))
    rules = [jaxq.Rule(".*", op="dot_general", recipe=R.Int4(block_size=64))]
    q = jaxq.quantize_model(model, rules)
    steps = q.blocks.mlp.down.jaxq_step_rhs
    assert isinstance(steps, nnx.Param)
    assert jaxq.wrapping.learned_steps_of(q.blocks.mlp.down)["lhs"] is None  # weights only
    opt = nnx.Optimizer(q, optax.adam(1e-2), wrt=nnx.Param)
    before = np.asarray(steps.get_value())

    @nnx.jit
    def step(model, opt, tokens):
        loss, grads = jaxq.wrapping.value_and_grad(_loss)(model, tokens)
        opt.update(model, grads)
        return loss

    losses = [float(step(q, opt, TOKENS)) for _ in range(4)]  # the optimizer keeps the steps
    after = np.asarray(q.blocks.mlp.down.jaxq_step_rhs.get_value())
    assert after.shape == before.shape and not np.array_equal(before, after)
    assert losses[-1] < losses[0], losses


def test_wrap_time_errors_name_the_layer():
    model = Decoder(rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"blocks/attn/k.*block size 128 does not divide .* 64"):
        jaxq.quantize_model(model, [jaxq.Rule(".*", recipe=R.FP8Blockwise())])
    with pytest.raises(ValueError, match="not a valid regular expression"):
        jaxq.Rule("blocks/(", recipe=R.FP8Current())
    conv = nnx.Conv(4, 8, (3, 3), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="no conv path"):
        jaxq.quantize_model(conv, [jaxq.Rule(".*", recipe=R.MXFP8())])
    with pytest.raises(ValueError, match="learned step sizes are supported on nnx.Linear"):
        jaxq.quantize_model(model, [jaxq.Rule(".*", recipe=R.Int4(block_size=16))])


def test_conv_and_multihead_attention_layers():
    conv = nnx.Conv(4, 8, (3, 3), rngs=nnx.Rngs(0))
    qc = jaxq.quantize_model(conv, [jaxq.Rule(".*", recipe=R.FP8Current())])
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 4))
    assert 1e-3 < _rel(qc(x), conv(x)) < 0.1
    mha = nnx.MultiHeadAttention(num_heads=4, in_features=32, qkv_features=32, decode=False,
                                 rngs=nnx.Rngs(0))  # fmt: skip
    qm = jaxq.quantize_model(mha, [jaxq.Rule(".*", recipe=R.MXFP8())])
    assert {p for p, _, _ in jaxq.wrapping.layers(qm)} == {"query", "key", "value", "out"}
    h = jax.random.normal(jax.random.key(1), (2, 8, 32))
    assert 1e-3 < _rel(qm(h), mha(h)) < 0.15


def test_orbax_checkpoint_restores_state_bit_exactly(tmp_path):
    import orbax.checkpoint as ocp

    model = Decoder(rngs=nnx.Rngs(0))
    q = jaxq.quantize_model(model, [jaxq.Rule(".*", recipe=R.FP8Delayed(history_length=4))])

    @nnx.jit
    def step(model, tokens):
        loss, grads = jaxq.wrapping.value_and_grad(_loss)(model, tokens)
        return loss, grads

    step(q, TOKENS)
    state = nnx.state(q)
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(tmp_path / "ckpt", state)
    ckpt.wait_until_finished()
    rules = [jaxq.Rule(".*", recipe=R.FP8Delayed(history_length=4))]
    fresh = jaxq.quantize_model(Decoder(rngs=nnx.Rngs(5)), rules)
    restored = ckpt.restore(tmp_path / "ckpt", nnx.state(fresh))
    nnx.update(fresh, restored)
    for a, b in zip(jax.tree.leaves(nnx.state(q)), jax.tree.leaves(nnx.state(fresh)),
                    strict=True):  # fmt: skip
        np.testing.assert_array_equal(a, b)
    (l1, g1), (l2, g2) = step(q, TOKENS), step(fresh, TOKENS)
    assert float(l1) == float(l2)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
        np.testing.assert_array_equal(a, b)
