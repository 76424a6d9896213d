"""jaxq.quantize_model on Linen models written as Flax's examples write them."""

from __future__ import annotations

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
