"""jaxq.ptq.convert: serving equals the quantization-aware forward, packed bytes, models
written as Flax's examples write them, checkpoints and bad input."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from wrapping.gemma_style import Decoder
from wrapping.linen_models import TransformerLM

import jaxq
from jaxq import ptq

D, H, OUT = 256, 256, 128
# The newest-JAX pass of make test runs three of them (the others are marked sweep).
_CORE = ("w4g128", "nvfp4", "w8a8_e4m3")
SCHEMES = [
    s if s.name in _CORE else pytest.param(s, marks=pytest.mark.sweep)
    for s in (ptq.W8(), ptq.W4(128), ptq.W4(32), ptq.NF4(64), ptq.FP4(32), ptq.MXFP4(),
              ptq.NVFP4(), ptq.FP8Weights(), ptq.W8A8("int8"), ptq.W8A8("e4m3"), ptq.W4A8(),
              ptq.W4A8(64))
]  # fmt: skip
# Relative output error of a two-layer MLP against float: generous bounds per family.
BOUND = {"w8": 0.01, "fp8w": 0.05, "w8a8_int8": 0.03, "w8a8_e4m3": 0.08}


def _mlp(seed=0):
    rngs = nnx.Rngs(seed)
    return nnx.Sequential(nnx.Linear(D, H, rngs=rngs), nnx.gelu, nnx.Linear(H, OUT, rngs=rngs))


def _batches(n=2, seed=1, rows=24):
    keys = jax.random.split(jax.random.key(seed), n)
    return [jax.random.normal(k, (rows, D)) * 2.0 for k in keys]


def _rel(a, b):
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def _packed(model):
    out = {}
    for path, layer, _ in jaxq.wrapping.layers(model):
        v = vars(layer)["kernel"]
        if isinstance(v, ptq.PackedKernel):
            out[path] = v.get_value()
    return out


def qat_model(model, rules, served_model):
    """The quantization-aware model of the same rules, its activation histories set to the
    amaxes the conversion calibrated."""
    q = jaxq.quantize_model(model, rules)
    packed = _packed(served_model)
    for path, layer, _ in jaxq.wrapping.layers(q):
        if "jaxq_state" in vars(layer):
            st = layer.jaxq_state.get_value()
            amax = packed[path].act_amax
            hist = jnp.broadcast_to(jnp.reshape(amax, amax.shape + (1,)), st.lhs_history.shape)
            layer.jaxq_state.set_value(dataclasses.replace(st, lhs_history=hist))
    return q


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda r: getattr(r, "name", ""))
def test_serving_equals_qat_forward_bit_exactly(scheme):
    model = _mlp()
    rules = [jaxq.Rule(".*", recipe=scheme)]
    served = ptq.convert(model, None, rules, calibration=_batches())
    assert served.float_layers == ()
    q = qat_model(model, rules, served.model)
    x = jax.random.normal(jax.random.key(7), (5, D)) * 2.0  # unseen, ragged batch
    y_serve = nnx.jit(lambda m, x: m(x))(served.model, x)
    y_qat = nnx.jit(lambda m, x: m(x))(q, x)
    np.testing.assert_array_equal(np.asarray(y_serve), np.asarray(y_qat))
    y = model(x)
    assert 1e-5 < _rel(y_serve, y) < BOUND.get(scheme.name, 0.25)


@pytest.mark.parametrize("scheme,bits", [
    (ptq.W8(), 8 + 32 / D), (ptq.W4(128), 4 + 32 / 128), (ptq.NF4(64), 4 + 32 / 64),
    (ptq.FP4(32), 4 + 32 / 32), (ptq.MXFP4(), 4 + 8 / 32), (ptq.NVFP4(), 4 + 8 / 16),
    (ptq.FP8Weights(), 8 + 32 / D), (ptq.W4A8(), 4 + 32 / D),
], ids=lambda v: getattr(v, "name", ""))  # fmt: skip
def test_weights_are_stored_packed_with_the_promised_bytes(scheme, bits):
    model = _mlp()
    served = ptq.convert(model, None, [jaxq.Rule(".*", recipe=scheme)], calibration=_batches(1))
    for path, qw in _packed(served.model).items():
        n, k = qw.kernel_shape[1], qw.kernel_shape[0]
        codes = qw.weight.codes
        assert codes.dtype in (jnp.uint8, jnp.int8, jnp.float8_e4m3fn)
        if bits < 8:
            assert codes.shape == (1, n, k // 2), path  # two codes per byte along K
        extra = 4 if scheme.name == "nvfp4" else 0  # the NVFP4 tensor scale
        act = 0 if qw.act_amax is None else 4
        assert jaxq.ptq.weight_bytes(qw) == n * k * bits / 8 + extra + act
    float_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert jaxq.ptq.weight_bytes(served.params) < float_bytes * (bits + 1) / 32


def test_serving_forward_has_no_float_copy_of_the_weights():
    big = nnx.Linear(1024, 1024, use_bias=False, rngs=nnx.Rngs(0))
    x = jnp.ones((1, 1024))
    served = ptq.convert(big, None, [jaxq.Rule(".*", recipe=ptq.W4(128))], calibration=[x])
    gdef, state = nnx.split(served.model)

    def f(state, x):
        return nnx.merge(gdef, state)(x)

    mem = jax.jit(f).lower(state, x).compile().memory_analysis()
    float_bytes = 1024 * 1024 * 4
    if mem is None:
        pytest.skip("this backend reports no memory analysis")
    # The step takes the packed weight only; the kernel placeholder is dead code. XLA:CPU
    # dequantizes into one transient buffer for its GEMM (the kernels layer fuses this).
    assert mem.argument_size_in_bytes < float_bytes / 6
    assert mem.temp_size_in_bytes < 1.5 * float_bytes


def test_gemma_style_decoder_with_einsum_and_scan():
    model = Decoder(rngs=nnx.Rngs(0))
    tokens = [jax.random.randint(jax.random.key(i), (2, 16), 0, 256) for i in range(2)]
    rules = [jaxq.Rule(".*", recipe=ptq.W8A8("e4m3"))]
    served = ptq.convert(model, None, rules, calibration=tokens)
    assert set(_packed(served.model)) == {p for p, _, _ in jaxq.wrapping.layers(model)}
    qw = _packed(served.model)["blocks/attn/q"]
    assert qw.act_amax.shape == (2,)  # one static scale per scanned layer
    q = qat_model(model, rules, served.model)
    t = jax.random.randint(jax.random.key(9), (3, 16), 0, 256)
    y_serve = nnx.jit(lambda m, t: m(t))(served.model, t)
    np.testing.assert_array_equal(np.asarray(y_serve), np.asarray(nnx.jit(lambda m, t: m(t))(q, t)))
    assert 1e-4 < _rel(y_serve, model(t)) < 0.1


def test_linen_transformer_with_scan_equals_qat():
    model = TransformerLM()
    tokens = [jax.random.randint(jax.random.key(i), (2, 16), 0, 256) for i in range(2)]
    variables = model.init(jax.random.key(0), tokens[0])
    rules = [jaxq.Rule(r"head", recipe=None), jaxq.Rule(".*", recipe=ptq.W8A8("int8"))]
    served = ptq.convert(model, variables, rules, calibration=tokens)
    assert served.float_layers == ("head",)
    kernels = served.params["params"]["layers"]["Dense_0"]["kernel"]
    assert isinstance(kernels, ptq.QuantizedWeight) and kernels.act_amax.shape == (2,)
    t = jax.random.randint(jax.random.key(5), (3, 16), 0, 256)
    y_serve = jax.jit(served.model.apply)(served.params, t)
    # The QAT model: same rules, histories at the calibrated amaxes.
    q = jaxq.quantize_model(model, rules)
    v = q.init(jax.random.key(0), tokens[0])

    def amax_of(path):
        node = served.params["params"]
        for p in path:
            node = node[p]
        return node["kernel"].act_amax

    state = jax.tree_util.tree_map_with_path(
        lambda kp, st: dataclasses.replace(st, lhs_history=jnp.broadcast_to(
            amax_of([k.key for k in kp][:-1])[..., None], st.lhs_history.shape)),
        v["jaxq"], is_leaf=lambda x: isinstance(x, jaxq.ops.OpState),
    )  # fmt: skip
    state = jax.tree.map(lambda x: x, state)
    y_qat = q.apply({**v, "params": variables["params"], "jaxq": state}, t)
    np.testing.assert_array_equal(np.asarray(y_serve), np.asarray(y_qat))
    assert 1e-4 < _rel(y_serve, model.apply(variables, t)) < 0.1


def test_gpt_converts_and_keeps_its_loss():
    from jaxq.models import GPT, GPTConfig

    config = GPTConfig(d_model=64, n_heads=2, n_layers=2, seq_len=32)
    model = GPT(config, rngs=nnx.Rngs(0))
    tokens = [jax.random.randint(jax.random.key(i), (2, 32), 0, 256) for i in range(2)]
    served = ptq.convert(model, None, [jaxq.Rule(".*", recipe=ptq.W8())], calibration=tokens)
    t = tokens[0]
    assert len(_packed(served.model)) == 2 * 4  # every projection of both blocks
    assert 1e-6 < _rel(served.model(t), model(t)) < 0.01


def test_checkpoint_roundtrip_is_bit_exact(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    model = _mlp()
    rules = [jaxq.Rule("layers/0", recipe=ptq.NVFP4()), jaxq.Rule(".*", recipe=ptq.W8A8("e4m3"))]
    served = ptq.convert(model, None, rules, calibration=_batches(1))
    gdef, state = nnx.split(served.model)
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(tmp_path / "served", state)
    ckpt.wait_until_finished()
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state)
    restored = ckpt.restore(tmp_path / "served", abstract)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored), strict=True):
        assert a.dtype == b.dtype
        a, b = np.atleast_1d(a), np.atleast_1d(b)
        np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8))
    x = _batches(1, seed=3)[0]
    np.testing.assert_array_equal(np.asarray(nnx.merge(gdef, restored)(x)),
                                  np.asarray(served.model(x)))  # fmt: skip


# ------------------------------------------------------------------------ bad input


def test_unmatched_layers_stay_float_and_are_listed():
    model = _mlp()
    served = ptq.convert(model, None, [jaxq.Rule("layers/2", recipe=ptq.W8())],
                         calibration=_batches(1))  # fmt: skip
    assert served.float_layers == ("layers/0",)
    assert isinstance(vars(served.model.layers[0])["kernel"], nnx.Param)


def test_converting_a_converted_model_is_an_error():
    served = ptq.convert(_mlp(), None, [jaxq.Rule(".*", recipe=ptq.W8())], calibration=_batches(1))
    with pytest.raises(ValueError, match="already converted"):
        ptq.convert(served.model, None, [jaxq.Rule(".*", recipe=ptq.W8())],
                    calibration=_batches(1))  # fmt: skip


def test_bad_calibration_batches_name_the_layer():
    rules = [jaxq.Rule(".*", recipe=ptq.W8A8())]
    with pytest.raises(ValueError, match="layers/0"):
        ptq.convert(_mlp(), None, rules, calibration=[jnp.ones((4, D - 1))])
    with pytest.raises(ValueError, match="batch 1"):
        ptq.convert(_mlp(), None, rules, calibration=[jnp.ones((4, D)), jnp.ones((4, D + 1))])
    with pytest.raises(ValueError, match="batch 1"):
        ptq.convert(_mlp(), None, rules,
                    calibration=[jnp.ones((4, D)), jnp.ones((4, D), jnp.bfloat16)])  # fmt: skip
    with pytest.raises(ValueError, match="calibration batches are required"):
        ptq.convert(_mlp(), None, rules)
    with pytest.raises(TypeError, match="NNX or Linen"):
        ptq.convert(object(), None, rules, calibration=[jnp.ones((4, D))])


def test_non_finite_calibration_values_are_ignored():
    rules = [jaxq.Rule(".*", recipe=ptq.W8A8("int8"))]
    clean = _batches(1)
    dirty = clean[0].at[3, 5].set(jnp.nan).at[7, 1].set(jnp.inf)
    a = _packed(ptq.convert(_mlp(), None, rules, calibration=clean).model)["layers/0"]
    b = _packed(ptq.convert(_mlp(), None, rules, calibration=[dirty]).model)["layers/0"]
    finite = jnp.where(jnp.isfinite(dirty), jnp.abs(dirty), 0.0).max()
    assert float(b.act_amax) == float(finite) <= float(a.act_amax)
    assert np.isfinite(float(b.act_amax))


# ------------------------------------------------------- quantization-aware training


def _perturb_steps(tree, seed):
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(treedef, [a * jnp.exp(0.2 * jax.random.normal(k, a.shape))
                                        for a, k in zip(leaves, keys, strict=True)])  # fmt: skip


@pytest.mark.parametrize("recipe", [jaxq.recipes.Int4(), jaxq.recipes.Int8(learned_step=True)],
                         ids=["int4_g128_lsq", "int8_lsq"])  # fmt: skip
def test_qat_model_with_learned_steps_converts_to_its_own_forward(recipe):
    rules = [jaxq.Rule(".*", recipe=recipe)]
    q = jaxq.quantize_model(_mlp(), rules)
    for _, layer, _ in jaxq.wrapping.layers(q):  # as if trained: steps moved off their init
        layer.jaxq_step_rhs.set_value(_perturb_steps(layer.jaxq_step_rhs.get_value(), 3))
        if "jaxq_step_lhs" in vars(layer):
            layer.jaxq_step_lhs.set_value(_perturb_steps(layer.jaxq_step_lhs.get_value(), 4))
    served = ptq.convert(q, None, rules, calibration=_batches(1))
    qw = _packed(served.model)["layers/0"]
    assert qw.weight.codes.shape[-1] == D // 2 if recipe.rhs.fmt.bits == 4 else D
    assert not any(jaxq.wrapping.learned_steps_of(layer) for _, layer, _ in
                   jaxq.wrapping.layers(served.model))  # fmt: skip
    x = jax.random.normal(jax.random.key(7), (5, D))
    np.testing.assert_array_equal(np.asarray(nnx.jit(lambda m, x: m(x))(served.model, x)),
                                  np.asarray(nnx.jit(lambda m, x: m(x))(q, x)))  # fmt: skip
    with pytest.raises(ValueError, match="learns its step sizes"):
        ptq.convert(_mlp(), None, rules, calibration=_batches(1))


def test_linen_qat_model_with_learned_steps_converts_to_its_own_forward():
    import flax.linen as nn

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(OUT)(nn.gelu(nn.Dense(H)(x)))

    rules = [jaxq.Rule(".*", recipe=jaxq.recipes.Int4(block_size=64))]
    q = jaxq.quantize_model(MLP(), rules)
    x = _batches(1)[0]
    v = q.init(jax.random.key(0), x)
    params = dict(v["params"])
    for name in params:
        params[name] = {**params[name],
                        "jaxq_steps": _perturb_steps(params[name]["jaxq_steps"], 1)}  # fmt: skip
    v = {**v, "params": params}
    served = ptq.convert(q, v, rules, calibration=[x])
    assert "jaxq_steps" not in served.params["params"]["Dense_0"]
    t = jax.random.normal(jax.random.key(8), (3, D))
    np.testing.assert_array_equal(np.asarray(jax.jit(served.model.apply)(served.params, t)),
                                  np.asarray(jax.jit(q.apply)(v, t)))  # fmt: skip


def test_static_activation_calibrations_percentile_and_mse():
    batches = _batches(2)
    amax = {}
    for name, cal in [("absmax", jaxq.Absmax()), ("percentile", jaxq.Percentile(99.0)),
                      ("mse", jaxq.MSE())]:  # fmt: skip
        rules = [jaxq.Rule(".*", recipe=ptq.W8A8("int8", calibration=cal))]
        served = ptq.convert(_mlp(), None, rules, calibration=batches)
        amax[name] = float(_packed(served.model)["layers/0"].act_amax)
        if name == "percentile":  # the mean over batches of each batch's percentile
            want = np.mean([np.percentile(np.abs(np.asarray(b)), 99.0) for b in batches])
            assert amax[name] == pytest.approx(want, rel=1e-2)
    assert amax["percentile"] < amax["absmax"] and amax["mse"] <= amax["absmax"] * 1.0001
    assert amax["absmax"] == pytest.approx(max(float(jnp.abs(b).max()) for b in batches))


def test_bfloat16_model_serves_in_bfloat16():
    rngs = nnx.Rngs(0)
    model = nnx.Sequential(nnx.Linear(D, H, param_dtype=jnp.bfloat16, rngs=rngs), nnx.gelu,
                           nnx.Linear(H, OUT, param_dtype=jnp.bfloat16, rngs=rngs))  # fmt: skip
    rules = [jaxq.Rule(".*", recipe=ptq.W8A8("e4m3"))]
    xs = [b.astype(jnp.bfloat16) for b in _batches(1)]
    served = ptq.convert(model, None, rules, calibration=xs)
    y = served.model(xs[0])
    assert y.dtype == jnp.bfloat16
    q = qat_model(model, rules, served.model)
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(q(xs[0]), np.float32))


def test_linen_einsum_layers_convert():
    import flax.linen as nn

    class Attn(nn.Module):
        @nn.compact
        def __call__(self, x):
            q = nn.Einsum((D, 4, 32), "btd,dhk->bthk", name="q")(x)
            return nn.Einsum((4, 32, D), "...hk,hkd->...d", use_bias=False, name="o")(q)

    x = jax.random.normal(jax.random.key(1), (2, 8, D))
    model = Attn()
    v = model.init(jax.random.key(0), x)
    rules = [jaxq.Rule(".*", recipe=ptq.W8A8("e4m3"))]
    served = ptq.convert(model, v, rules, calibration=[x])
    assert served.float_layers == ()
    assert isinstance(served.params["params"]["o"]["kernel"], ptq.QuantizedWeight)
    y = jax.jit(served.model.apply)(served.params, x)
    assert 1e-4 < _rel(y, model.apply(v, x)) < 0.1


def test_layers_without_a_serving_path_stay_float_and_are_listed():
    from wrapping.test_moe import LinenMoE, NNXMoE, X

    rules = [jaxq.Rule(".*", recipe=ptq.W8())]
    served = ptq.convert(NNXMoE(rngs=nnx.Rngs(0)), None, rules, calibration=[X])
    assert served.float_layers == ("",)  # the experts' ragged_dot
    v = LinenMoE().init(jax.random.key(0), X)
    served = ptq.convert(LinenMoE(), v, rules, calibration=[X])
    assert served.float_layers == ("",)
    assert isinstance(served.params["params"]["router"]["kernel"], ptq.QuantizedWeight)
