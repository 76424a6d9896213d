"""jaxq.ptq's algorithms on whole models: rotation keeps the float model, and each
algorithm beats round-to-nearest where it should."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from wrapping.gemma_style import Decoder

import jaxq
from jaxq import ptq
from jaxq.ops import Recipe

D, H, OUT = 256, 512, 128


def _mlp(seed=0):
    rngs = nnx.Rngs(seed)
    return nnx.Sequential(nnx.Linear(D, H, rngs=rngs), nnx.gelu, nnx.Linear(H, OUT, rngs=rngs))


def _data(n, seed, rows=64):
    """Correlated inputs with a few outlier channels, as LLM activations have."""
    keys = jax.random.split(jax.random.key(seed), n)
    mix = jax.random.normal(jax.random.key(99), (D, D)) / np.sqrt(D)
    scale = jnp.ones(D).at[jnp.array([3, 77, 150])].set(25.0)
    return [(jax.random.normal(k, (rows, D)) @ (jnp.eye(D) + 2 * mix)) * scale for k in keys]


def _err(served, model, xs):
    num = sum(float(jnp.sum((served(x) - model(x)) ** 2)) for x in xs)
    return num / sum(float(jnp.sum(model(x) ** 2)) for x in xs)


CAL, TEST = _data(2, 1, rows=128), _data(1, 2, rows=128)


def test_rotation_leaves_the_float_model_unchanged():
    model = _mlp()
    rules = [jaxq.Rule(".*", recipe=Recipe("float"))]
    plan = ptq.rotate(model, None, rules, CAL)
    assert plan.layer("layers/0").rotation_block == 256
    assert plan.layer("layers/2").rotation_block == 256  # 512 = 2 x 256 blocks
    served = ptq.convert(model, None, rules, calibration=CAL, plan=plan).model
    x = TEST[0]
    np.testing.assert_allclose(served(x), model(x), rtol=2e-5, atol=2e-5 * float(
        jnp.abs(model(x)).max()))  # fmt: skip


def test_rotation_of_a_scanned_einsum_decoder_leaves_it_unchanged():
    model = Decoder(rngs=nnx.Rngs(0))
    tokens = [jax.random.randint(jax.random.key(0), (2, 16), 0, 256)]
    rules = [jaxq.Rule(".*", recipe=Recipe("float"))]
    plan = ptq.rotate(model, None, rules, tokens)
    assert plan.layer("blocks/attn/q").rotation.shape == (2, 2)  # a key per scanned layer
    served = ptq.convert(model, None, rules, calibration=tokens, plan=plan).model
    y, y0 = served(tokens[0]), model(tokens[0])
    assert float(jnp.max(jnp.abs(y - y0))) < 1e-4 * float(jnp.max(jnp.abs(y0)))


@pytest.fixture(scope="module")
def w4_errors():
    model = _mlp()
    rules = [jaxq.Rule(".*", recipe=ptq.W4(128))]
    out = {}
    out["rtn"] = _err(ptq.convert(model, None, rules, calibration=CAL).model, model, TEST)
    for name, make in {
        "awq": lambda: ptq.awq(model, None, rules, CAL, grid=10),
        "gptq": lambda: ptq.gptq(model, None, rules, CAL),
        "rotate+gptq": lambda: ptq.gptq(model, None, rules, CAL,
                                        plan=ptq.rotate(model, None, rules, CAL)),
    }.items():  # fmt: skip
        plan = make()
        served = ptq.convert(model, None, rules, calibration=CAL, plan=plan).model
        out[name] = _err(served, model, TEST)
    return out


@pytest.mark.sweep
@pytest.mark.parametrize("name", ["awq", "gptq", "rotate+gptq"])
def test_w4_algorithms_beat_round_to_nearest_on_held_out_data(w4_errors, name):
    assert w4_errors[name] < 0.9 * w4_errors["rtn"], w4_errors


@pytest.mark.sweep
def test_smoothquant_helps_w8a8_int8_with_outlier_channels():
    model = _mlp()
    rules = [jaxq.Rule(".*", recipe=ptq.W8A8("int8"))]
    rtn = _err(ptq.convert(model, None, rules, calibration=CAL).model, model, TEST)
    plan = ptq.smoothquant(model, None, rules, CAL, alpha=0.5)
    smooth = _err(ptq.convert(model, None, rules, calibration=CAL, plan=plan).model, model, TEST)
    assert smooth < 0.7 * rtn, (smooth, rtn)


def test_gptq_serving_weight_is_the_plans_weight_and_algorithms_refuse_wrong_order():
    model = _mlp()
    rules = [jaxq.Rule(".*", recipe=ptq.W4(128))]
    plan = ptq.gptq(model, None, rules, CAL[:1])
    served = ptq.convert(model, None, rules, calibration=CAL[:1], plan=plan).model
    qw = vars(served.layers[0])["kernel"].get_value()
    np.testing.assert_array_equal(qw.weight.codes, plan.layer("layers/0").weight.codes)
    with pytest.raises(ValueError, match="rotate first"):
        ptq.rotate(model, None, rules, CAL[:1], plan=plan)
    with pytest.raises(ValueError, match="before it"):
        ptq.smoothquant(model, None, rules, CAL[:1], plan=plan)
