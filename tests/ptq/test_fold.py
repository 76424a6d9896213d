"""jaxq.ptq.fold: smoothing divisors folded into the norm before the layers, on a Linen
transformer under nn.scan (Flax's MultiHeadDotProductAttention) and an NNX block."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from wrapping.linen_models import TransformerLM

import jaxq
from jaxq import ptq

ATTN = "layers/MultiHeadDotProductAttention_0"
QKV = tuple(f"{ATTN}/{n}" for n in ("query", "key", "value"))
INTO = {"layers/LayerNorm_0": QKV, "layers/LayerNorm_1": ("layers/Dense_0",)}


def _rel(a, b):
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


@pytest.fixture(scope="module")
def linen_lm():
    model = TransformerLM()
    tokens = [jax.random.randint(jax.random.key(i), (2, 16), 0, 256) for i in range(2)]
    variables = model.init(jax.random.key(0), tokens[0])
    # LLM-like outlier channels: a few norm gains much larger than the rest.
    p = variables["params"]["layers"]
    for name in ("LayerNorm_0", "LayerNorm_1"):
        p[name]["scale"] = p[name]["scale"].at[:, jnp.array([3, 17, 40])].set(30.0)
        p[name]["bias"] = jax.random.normal(jax.random.key(7), p[name]["bias"].shape) * 0.1
    return model, variables, tokens


def test_linen_scan_fold_keeps_the_float_model_and_serving(linen_lm):
    model, variables, tokens = linen_lm
    rules = [jaxq.Rule("head", recipe=None), jaxq.Rule(".*", recipe=ptq.W8A8("int8"))]
    groups = [QKV, ("layers/Dense_0",)]
    plan = ptq.smoothquant(model, variables, rules, tokens, groups=groups)
    s = plan.layer(QKV[0]).in_scale
    assert s.shape == (2, 64)  # one divisor per scanned layer
    for path in QKV[1:]:
        np.testing.assert_array_equal(plan.layer(path).in_scale, s)
    folded = ptq.fold(model, variables, rules, tokens, plan=plan, into=INTO)

    # The norms carry the divisors; the float function is unchanged.
    ln0 = folded.params["params"]["layers"]["LayerNorm_0"]
    old = variables["params"]["layers"]["LayerNorm_0"]
    np.testing.assert_array_equal(ln0["scale"], old["scale"] / s)
    np.testing.assert_array_equal(ln0["bias"], old["bias"] / s)
    assert float(jnp.max(jnp.abs(s - 1.0))) > 0.5  # the divisors are far from the identity
    t = jax.random.randint(jax.random.key(5), (3, 16), 0, 256)
    y0 = model.apply(variables, t)
    assert _rel(model.apply(folded.params, t), y0) < 1e-5

    # Folded layers serve without a divisor; the MLP's down projection (after the GELU)
    # keeps its own.
    assert all(folded.plan.layer(p).in_scale is None for p in QKV + ("layers/Dense_0",))
    assert folded.plan.layer(QKV[0]).algorithm == ("smoothquant", "fold")
    assert folded.plan.layer("layers/Dense_1").in_scale is not None
    served = ptq.convert(model, folded.params, rules, calibration=tokens, plan=folded.plan)
    unfolded = ptq.convert(model, variables, rules, calibration=tokens, plan=plan)
    node = served.params["params"]["layers"]
    assert node["MultiHeadDotProductAttention_0"]["query"]["kernel"].in_scale is None
    assert node["Dense_1"]["kernel"].in_scale is not None
    assert unfolded.params["params"]["layers"]["Dense_0"]["kernel"].in_scale is not None
    y_f = served.model.apply(served.params, t)
    y_u = unfolded.model.apply(unfolded.params, t)
    rtn = ptq.convert(model, variables, rules, calibration=tokens)
    e_rtn = _rel(rtn.model.apply(rtn.params, t), y0)
    # The same quantized model up to where the division is rounded.
    assert _rel(y_f, y0) < 1.1 * _rel(y_u, y0) + 1e-4
    assert _rel(y_f, y0) < 0.8 * e_rtn, (_rel(y_f, y0), e_rtn)


class _Block(nnx.Module):
    def __init__(self, d=128, rngs=None):
        self.norm = nnx.LayerNorm(d, rngs=rngs)
        self.q = nnx.Linear(d, 64, rngs=rngs)
        self.k = nnx.Linear(d, 64, rngs=rngs)
        self.v = nnx.Linear(d, 64, rngs=rngs)

    def __call__(self, x):
        h = self.norm(x)
        return jnp.concatenate([self.q(h), self.k(h), self.v(h)], axis=-1)


def _block():
    m = _Block(rngs=nnx.Rngs(0))
    m.norm.scale[...] = m.norm.scale[...].at[jnp.array([5, 9, 60])].set(25.0)
    return m


def test_nnx_awq_groups_fold_then_gptq_beats_round_to_nearest():
    model = _block()
    xs = [jax.random.normal(jax.random.key(i), (64, 128)) for i in range(3)]
    test = jax.random.normal(jax.random.key(9), (64, 128))
    rules = [jaxq.Rule(".*", recipe=ptq.W4(32))]
    qkv = ("q", "k", "v")
    plan = ptq.awq(model, None, rules, xs, groups=[qkv], clip=False, grid=10)
    folded = ptq.fold(model, None, rules, xs, plan=plan, into={"norm": qkv})
    assert folded.params is None and folded.model is not model
    np.testing.assert_allclose(folded.model(test), model(test), rtol=1e-5,
                               atol=1e-5 * float(jnp.max(jnp.abs(model(test)))))  # fmt: skip
    np.testing.assert_array_equal(model.norm.scale[...][:3], 1.0)  # the input model is intact
    gplan = ptq.gptq(folded.model, None, rules, xs, plan=folded.plan)
    served = ptq.convert(folded.model, None, rules, calibration=xs, plan=gplan).model
    assert served.q.kernel.get_value().in_scale is None
    rtn = ptq.convert(model, None, rules, calibration=xs).model
    assert _rel(served(test), model(test)) < 0.9 * _rel(rtn(test), model(test))


def test_fold_refuses_what_it_cannot_fold():
    model = _block()
    xs = [jax.random.normal(jax.random.key(0), (32, 128))]
    rules = [jaxq.Rule(".*", recipe=ptq.W8A8("int8"))]
    qkv = ("q", "k", "v")
    separate = ptq.smoothquant(model, None, rules, xs)  # no groups: three different divisors
    with pytest.raises(ValueError, match="different divisors"):
        ptq.fold(model, None, rules, xs, plan=separate, into={"norm": qkv})
    plan = ptq.smoothquant(model, None, rules, xs, groups=[qkv])
    with pytest.raises(ValueError, match="no module at 'nope'"):
        ptq.fold(model, None, rules, xs, plan=plan, into={"nope": qkv})
    with pytest.raises(ValueError, match="no smoothing divisor"):
        ptq.fold(model, None, rules, xs, plan=ptq.Plan(), into={"norm": qkv})
    rotated = ptq.rotate(model, None, rules, xs)
    with pytest.raises(ValueError, match="rotated"):
        ptq.fold(model, None, rules, xs, plan=ptq.smoothquant(model, None, rules, xs,
                 groups=[qkv], plan=rotated), into={"norm": qkv})  # fmt: skip
    with pytest.raises(ValueError, match="two groups"):
        ptq.smoothquant(model, None, rules, xs, groups=[qkv, ("q",)])
    bare = _block()
    bare.norm = nnx.LayerNorm(128, use_scale=False, use_bias=False, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="no 'scale' parameter"):
        ptq.fold(bare, None, rules, xs, plan=ptq.smoothquant(bare, None, rules, xs,
                 groups=[qkv]), into={"norm": qkv})  # fmt: skip
