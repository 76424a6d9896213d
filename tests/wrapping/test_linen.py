"""jaxq.quantize_model on Linen models written as Flax's examples write them."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxq
from jaxq import recipes as R

from .linen_models import ResNet, TransformerLM

TOKENS = jax.random.randint(jax.random.key(0), (2, 17), 0, 256)
RULES = [jaxq.Rule(r".*head", recipe=None)]


def _rel(a, b):
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


@pytest.mark.sweep
@pytest.mark.parametrize("recipe", [R.FP8Current(), R.MXFP8(), R.Int8()], ids=lambda r: r.name)
def test_transformer_lm_with_scan_is_quantized_and_loads_float_params(recipe):
    model = TransformerLM()
    q = jaxq.quantize_model(model, [*RULES, jaxq.Rule(".*", recipe=recipe)])
    v0 = model.init(jax.random.key(0), TOKENS[:, :-1])
    v = q.init(jax.random.key(0), TOKENS[:, :-1])
    assert jax.tree.structure(v0["params"]) == jax.tree.structure(v["params"])
    variables = {**v, "params": v0["params"]}  # float parameters load unchanged
    y0, y1 = model.apply(v0, TOKENS[:, :-1]), q.apply(variables, TOKENS[:, :-1])
    hi = 0.5 if recipe.name == "nvfp4" else 0.2
    assert 1e-3 < _rel(y1, y0) < hi


def test_linen_train_step_threads_state():
    model = TransformerLM()
    rules = [*RULES, jaxq.Rule(".*", recipe=R.FP8Delayed(history_length=4))]
    q = jaxq.quantize_model(model, rules)
    v = q.init(jax.random.key(0), TOKENS[:, :-1])
    params, state = v["params"], v["jaxq"]
    tx = optax.adamw(1e-3)
    opt = tx.init(params)

    def loss_fn(params, state, tokens):
        logits = q.apply({"params": params, "jaxq": state}, tokens[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    @jax.jit
    def step(params, opt, state, tokens):
        loss, grads, state = R.value_and_grad(loss_fn)(params, state, tokens)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt, state, loss

    losses = []
    for _ in range(3):
        params, opt, state, loss = step(params, opt, state, TOKENS)
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    h = state["layers"]["Dense_0"]["state"]
    assert h.lhs_history.shape == (2, 4) and (np.asarray(h.grad_history[:, :3]) > 0).all()


def test_resnet_with_batchnorm_train_and_eval():
    model = ResNet()
    q = jaxq.quantize_model(model, [jaxq.Rule(".*", op="conv", recipe=R.FP8Current())])
    x = jax.random.normal(jax.random.key(0), (4, 8, 8, 3))
    v = q.init(jax.random.key(0), x)
    assert sorted(v) == ["batch_stats", "params"]
    y, upd = q.apply(v, x, train=True, mutable=["batch_stats"])
    y_eval = q.apply({**v, **upd}, x, train=False)
    y_float = model.apply({**v, **upd}, x, train=False)
    assert 1e-4 < _rel(y_eval, y_float) < 0.2


def test_learned_steps_go_in_params():
    model = TransformerLM()
    rules = [*RULES, jaxq.Rule(".*Dense_.*", recipe=R.Int4(block_size=64))]
    q = jaxq.quantize_model(model, rules)
    v = q.init(jax.random.key(0), TOKENS[:, :-1])
    assert "jaxq_steps" in v["params"]["layers"]["Dense_0"]
    assert "jaxq" not in v


class _EinsumAttn(nn.Module):  # Gemma-style projections written with nn.Einsum
    @nn.compact
    def __call__(self, x):
        q = nn.Einsum((64, 4, 16), "btd,dhk->bthk", name="q")(x)
        return nn.Einsum((4, 16, 64), "...hk,hkd->...d", use_bias=False, name="o")(q)


@pytest.mark.parametrize("recipe", [R.FP8Current(), R.Int4(block_size=64)],
                         ids=lambda r: r.name)  # fmt: skip
def test_linen_einsum_layers_are_wrapped_with_the_same_parameters(recipe):
    x = jax.random.normal(jax.random.key(1), (2, 8, 64))
    model = _EinsumAttn()
    v0 = model.init(jax.random.key(0), x)
    q = jaxq.quantize_model(model, [jaxq.Rule(".*", recipe=recipe)])
    v = q.init(jax.random.key(0), x)
    floats = {k: {n: a for n, a in p.items() if n != "jaxq_steps"}
              for k, p in v["params"].items()}  # fmt: skip
    assert jax.tree.structure(floats) == jax.tree.structure(v0["params"])
    assert ("jaxq_steps" in v["params"]["q"]) == recipe.learned_step
    params = {k: {**p, **v0["params"][k]} for k, p in v["params"].items()}  # float weights
    y0, y = model.apply(v0, x), q.apply({**v, "params": params}, x)
    assert 1e-3 < _rel(y, y0) < (0.4 if recipe.learned_step else 0.1)  # LSQ's initial steps

    def loss(p):
        return jnp.sum(q.apply({**v, "params": p}, x) ** 2)

    g = jax.grad(loss)(params)
    assert all(np.isfinite(a).all() and np.abs(a).sum() > 0 for a in jax.tree.leaves(g))
    untouched = jaxq.quantize_model(model, [jaxq.Rule("nothing", recipe=R.FP8Current())])
    np.testing.assert_array_equal(untouched.apply(v0, x), model.apply(v0, x))
