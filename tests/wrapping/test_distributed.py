"""A wrapped model end to end: gradient accumulation, data parallelism over 8 devices,
and checkpoints restored onto another layout or refused under other rules."""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

import jaxq
from jaxq import recipes as R

from .gemma_style import Decoder

TOKENS = jax.random.randint(jax.random.key(3), (8, 17), 0, 256)
RULES = [jaxq.Rule(".*", recipe=R.FP8Delayed(history_length=4))]


def _loss(model, tokens):
    logits = model(tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


def _states(model):
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, jaxq.QuantState))]


def _params(model):
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]


def test_multisteps_accumulation_updates_histories_once_with_the_max():
    full = jaxq.quantize_model(Decoder(rngs=nnx.Rngs(0)), RULES)
    micro = jaxq.quantize_model(Decoder(rngs=nnx.Rngs(0)), RULES)
    # Fill the histories once (an empty history scales by the current amax), so that the
    # microbatches and the whole batch quantize with the same delayed scales.
    value_and_grad = nnx.jit(jaxq.wrapping.value_and_grad(_loss))
    update = nnx.jit(lambda opt, model, grads: opt.update(model, grads))
    for m in (full, micro):
        value_and_grad(m, TOKENS)
    p0 = _params(micro)

    # One optimizer step on the whole batch.
    opt_full = nnx.Optimizer(full, optax.sgd(0.5), wrt=nnx.Param)
    _, grads = value_and_grad(full, TOKENS)
    update(opt_full, full, grads)

    # The same step from four microbatches of two sequences.
    k = 4
    opt = nnx.Optimizer(micro, optax.MultiSteps(optax.sgd(0.5), every_k_schedule=k),
                        wrt=nnx.Param)  # fmt: skip
    vg = nnx.jit(jaxq.wrapping.value_and_grad(_loss, update=False))
    seen, grad_amaxes = None, []
    for i in range(k):
        _, grads, obs = vg(micro, TOKENS[2 * i:2 * i + 2])
        update(opt, micro, grads)
        grad_amaxes.append(obs["blocks"]["mlp"]["down"]["jaxq_state"].get_value().grad_history)
        if i < k - 1:  # MultiSteps holds the parameters until the k-th microbatch
            for a, b in zip(p0, _params(micro), strict=True):
                np.testing.assert_array_equal(a, b)
        seen = obs if seen is None else R.merge(seen, obs)
    jaxq.wrapping.update_state(micro, seen)

    hist_full = full.blocks.mlp.down.jaxq_state.get_value()
    hist_micro = micro.blocks.mlp.down.jaxq_state.get_value()
    # Forward amaxes: the max over the microbatches is the whole batch's amax.
    np.testing.assert_allclose(hist_micro.lhs_history, hist_full.lhs_history, rtol=1e-6)
    np.testing.assert_allclose(hist_micro.rhs_history, hist_full.rhs_history, rtol=1e-6)
    # The gradient history took the largest microbatch amax, once (not the last one).
    want = np.max(np.stack([np.asarray(g)[..., 0] for g in grad_amaxes]), axis=0)
    np.testing.assert_array_equal(np.asarray(hist_micro.grad_history)[..., 0], want)
    assert np.all(np.asarray(hist_micro.grad_history)[..., 2:] == 0)  # rolled exactly once
    last = np.asarray(grad_amaxes[-1])[..., 0]
    assert np.any(want > last)  # the last microbatch alone would have lost the maximum
    # The parameter update points where the whole batch's does (each microbatch's E5M2
    # gradient is 4x the whole batch's against a history filled by the whole batch, so it
    # saturates more: close in direction, not equal).
    du = np.concatenate([(b - a).ravel() for a, b in zip(p0, _params(micro), strict=True)])
    dv = np.concatenate([(c - a).ravel() for a, c in zip(p0, _params(full), strict=True)])
    assert du @ dv / (np.linalg.norm(du) * np.linalg.norm(dv)) > 0.9


def _mesh():
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 host devices (XLA_FLAGS from conftest)")
    return jax.sharding.Mesh(np.array(jax.devices()[:8]), ("data",))


def _fsdp(mesh, x):
    """Parameters sharded over their first axis where it divides by 8, else replicated."""
    if np.ndim(x) >= 1 and np.shape(x)[0] % 8 == 0:
        return NamedSharding(mesh, PartitionSpec("data"))
    return NamedSharding(mesh, PartitionSpec())


def _functional_step(graphdef, tx):
    def step(params, rest, opt_state, tokens):
        model = nnx.merge(graphdef, params, rest)
        loss, grads = jaxq.wrapping.value_and_grad(_loss)(model, tokens)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        _, _, rest = nnx.split(model, nnx.Param, ...)
        return params, rest, opt_state, loss

    return jax.jit(step)


def test_data_parallel_fsdp_step_matches_one_device_with_global_amax(tmp_path):
    mesh = _mesh()
    tx = jaxq.optim.adamw_8bit(1e-3, block_size=64, min_quantized_size=256)
    model = jaxq.quantize_model(Decoder(rngs=nnx.Rngs(0)), RULES)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    step = _functional_step(graphdef, tx)

    *one, loss_one = step(params, rest, tx.init(params), TOKENS)

    replicated = NamedSharding(mesh, PartitionSpec())
    sp = jax.tree.map(lambda x: jax.device_put(x, _fsdp(mesh, x)), params)
    sr = jax.tree.map(lambda x: jax.device_put(x, replicated), rest)
    so = jax.tree.map(lambda x: jax.device_put(x, replicated), tx.init(params))
    batch = jax.device_put(TOKENS, NamedSharding(mesh, PartitionSpec("data")))
    *dp, loss_dp = step(sp, sr, so, batch)

    assert float(loss_dp) == pytest.approx(float(loss_one), rel=1e-5)
    # Recipe state: the amaxes are global (the maximum over all eight shards), so the
    # histories agree with the single-device run and are the same on every device. The
    # forward amaxes agree to float rounding. A gradient amax can move by more: the shards
    # sum in another order, and where that moves a value across an E5M2 rounding boundary
    # the flipped code (a 12-25% step) propagates to the earlier layers' gradients (seen:
    # one of 16 gradient amaxes 1.8% off, the rest within 1e-6). Per-shard amaxes would
    # be smaller almost everywhere, which the median check catches.
    grad_rel = []
    leaves = jax.tree_util.tree_leaves_with_path(one[1])
    for (path, a), b in zip(leaves, jax.tree.leaves(dp[1]), strict=True):
        if "grad_history" in jax.tree_util.keystr(path):
            a, b = np.asarray(a), np.asarray(b)
            grad_rel.extend((np.abs(a - b) / np.maximum(np.abs(a), 1e-30))[a > 0])
        else:
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5)
    assert np.median(grad_rel) < 1e-5 and np.max(grad_rel) < 0.05, sorted(grad_rel)[-3:]
    # The parameters after one step: Adam's first update is about lr·sign(g), so where
    # such a flipped gradient code turns a tiny gradient's sign, that weight moves by 2·lr
    # (seen: 36 of 4096 weights of one kernel); everything else agrees to rounding.
    for a, b in zip(jax.tree.leaves(one[0]), jax.tree.leaves(dp[0]), strict=True):
        a, b = np.asarray(a), np.asarray(b)
        assert np.isclose(a, b, rtol=1e-3, atol=1e-5).mean() > 0.98
        assert np.max(np.abs(a - b)) <= 2.5e-3
    embedding = dp[0]["embed"]["embedding"].get_value()
    assert embedding.sharding.spec == PartitionSpec("data")  # still FSDP-sharded

    # Save the sharded run, restore onto one device (another layout): bit-exact, and the
    # next step on the restored state is the next step of the sharded state, bit for bit.
    sharded = nnx.merge(graphdef, dp[0], dp[1])
    jaxq.wrapping.save(tmp_path / "ckpt", sharded, extra=dp[2])
    fresh = jaxq.quantize_model(Decoder(rngs=nnx.Rngs(9)), RULES)
    _, fp, _ = nnx.split(fresh, nnx.Param, ...)
    opt_back = jaxq.wrapping.restore(tmp_path / "ckpt", fresh, extra=tx.init(fp))
    for a, b in zip(jax.tree.leaves(nnx.state(sharded)), jax.tree.leaves(nnx.state(fresh)),
                    strict=True):  # fmt: skip
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert len(b.sharding.device_set) == 1
    for a, b in zip(jax.tree.leaves(dp[2]), jax.tree.leaves(opt_back), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    gathered = jax.tree.map(lambda x: jax.device_put(np.asarray(x)), (dp[0], dp[1], dp[2]))
    _, fp, fr = nnx.split(fresh, nnx.Param, ...)
    *_, loss_a = step(*gathered, TOKENS)
    *_, loss_b = step(fp, fr, opt_back, TOKENS)
    assert float(loss_a) == float(loss_b)


def test_restore_under_other_rules_says_what_differs(tmp_path):
    model = jaxq.quantize_model(Decoder(rngs=nnx.Rngs(0)), RULES)
    jaxq.wrapping.save(tmp_path / "ckpt", model)
    other = [jaxq.Rule("blocks/mlp/.*", recipe=R.FP8Delayed(history_length=8)),
             jaxq.Rule(".*", recipe=R.FP8Delayed(history_length=4))]  # fmt: skip
    fresh = jaxq.quantize_model(Decoder(rngs=nnx.Rngs(1)), other)
    with pytest.raises(ValueError, match=r"other rules or formats: blocks/mlp/down: recipe "
                       r"history_length 4 in the checkpoint, 8 in the model"):
        jaxq.wrapping.restore(tmp_path / "ckpt", fresh)
    # Same shapes, other recipe: orbax alone would restore this silently.
    same_shapes = [jaxq.Rule(".*", recipe=R.FP8Delayed(history_length=4, margin=1))]
    fresh = jaxq.quantize_model(Decoder(rngs=nnx.Rngs(1)), same_shapes)
    with pytest.raises(ValueError, match="recipe lhs.margin 0 in the checkpoint, 1 in the model"):
        jaxq.wrapping.restore(tmp_path / "ckpt", fresh)
    unwrapped = [jaxq.Rule("blocks/attn/.*", recipe=None), *RULES]
    fresh = jaxq.quantize_model(Decoder(rngs=nnx.Rngs(1)), unwrapped)
    with pytest.raises(ValueError, match=r"blocks/attn/q: recipe fp8_delayed in the "
                       r"checkpoint, no recipe in the model"):
        jaxq.wrapping.restore(tmp_path / "ckpt", fresh)
    # The same rules restore.
    fresh = jaxq.quantize_model(Decoder(rngs=nnx.Rngs(1)), RULES)
    jaxq.wrapping.restore(tmp_path / "ckpt", fresh)
    for a, b in zip(_states(model), _states(fresh), strict=True):
        np.testing.assert_array_equal(a, b)
