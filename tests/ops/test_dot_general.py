"""jaxq.ops.dot_general against references written from the math.

Forward: every recipe's output equals the float64 product of the dequantized operands,
each quantized independently here with ``jaxq.quantize`` in the layout the recipe names.
Backward: relative error against float32 within a stated budget per recipe; QAT gradients
equal the gradients of the fake-quantized function.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jaxq
from jaxq import recipes as R
from jaxq.ops import Quantizer, Recipe
from jaxq.ops.operand import quantize_operand

DN = (((1,), (0,)), ((), ()))
SEED = np.random.SeedSequence().entropy % 2**31  # fresh inputs every run


def _inputs(m=64, k=256, n=128, seed=SEED, outliers=True):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, k)).astype(np.float32)
    if outliers:
        x[:, rng.integers(0, k, 3)] *= 20.0  # outlier channels, as in real activations
    w = (rng.standard_normal((k, n)) * 0.05).astype(np.float32)
    return jnp.asarray(x), jnp.asarray(w)


def _state(r):
    return r.init(jax.random.key(7)) if r.needs_key else r.init()


def _deq(x, fmt, **kw):
    return np.asarray(jaxq.dequantize(jaxq.quantize(x, fmt, **kw)), np.float64)


def _mx_up(x, name):
    """MX quantize-dequantize along the last axis with the round-up scale rule, in numpy:
    each block of 32 is scaled by the smallest 2^e with 2^e * max >= amax, its elements
    cast by ml_dtypes (round to nearest even), in float64."""
    elem, top = {"mxfp8": (ml_dtypes.float8_e4m3fn, 448.0),
                 "mxfp4": (ml_dtypes.float4_e2m1fn, 6.0)}[name]  # fmt: skip
    x = np.asarray(x, np.float64)
    xb = x.reshape(*x.shape[:-1], -1, 32)
    amax = np.abs(xb).max(axis=-1, keepdims=True)
    e = np.where(amax > 0, np.ceil(np.log2(np.where(amax > 0, amax, 1) / top)), 0)
    scale = np.exp2(e)
    return ((xb / scale).astype(elem).astype(np.float64) * scale).reshape(x.shape)


def _reference_forward(name, x, w):
    """Dequantized operands in the recipe's layout, multiplied in float64."""
    wt = w.T  # (N, K): the weight as rows = output channels, contraction last
    if name in ("fp8_current", "fp8_delayed"):
        xd, wd = _deq(x, "e4m3"), _deq(wt, "e4m3")
    elif name == "fp8_static":
        xd = np.asarray(jaxq.cast(x, "e4m3"), np.float64)
        wd = np.asarray(jaxq.cast(wt, "e4m3"), np.float64)
    elif name == "fp8_blockwise":
        xd = _deq(x, "e4m3", block_size=128)
        n, k = wt.shape
        tiles = np.abs(np.asarray(wt)).reshape(n // 128, 128, k // 128, 128).max(axis=(1, 3))
        amax = np.repeat(tiles, 128, axis=0)
        wd = np.asarray(jaxq.dequantize(jaxq.quantize(wt, "e4m3", block_size=128,
                                                      amax=jnp.asarray(amax))), np.float64)
    elif name in ("mxfp8", "mxfp4"):
        xd, wd = _mx_up(x, name), _mx_up(wt, name)
    elif name == "nvfp4":
        n, k = wt.shape
        tiles = np.abs(np.asarray(wt)).reshape(n // 16, 16, k // 16, 16).max(axis=(1, 3))
        xd = _deq(x, "nvfp4")
        wd = np.asarray(jaxq.dequantize(jaxq.quantize(
            wt, "nvfp4", amax=jnp.asarray(np.repeat(tiles, 16, axis=0)))), np.float64)
    elif name == "int8":
        xd, wd = _deq(x, "int8", axis=0), _deq(wt, "int8", axis=0)
    elif name == "ternary":
        xd = _deq(x, "int8", axis=0)
        a = float(np.mean(np.abs(np.asarray(w, np.float64))))
        wd = np.clip(np.round(np.asarray(wt, np.float64) / np.float32(a)), -1, 1) * np.float32(a)
    else:
        raise KeyError(name)
    return xd @ wd.T


FORWARD = ["fp8_current", "fp8_delayed", "fp8_static", "fp8_blockwise", "mxfp8", "mxfp4",
           "nvfp4", "int8", "ternary"]  # fmt: skip


@pytest.mark.sweep
@pytest.mark.parametrize("name", FORWARD)
def test_forward_equals_dequantized_float64_product(name):
    x, w = _inputs()
    r = R.NAMED[name]()
    y = jax.jit(lambda x, w, s: jaxq.ops.dot_general(x, w, DN, recipe=r, state=s))(
        x, w, _state(r)
    )
    ref = _reference_forward(name, x, w)
    # float32 accumulation of 256 products, scales applied after: a few float32 ulps of the
    # sum of magnitudes.
    bound = 4 * 256 * np.finfo(np.float32).eps * (np.abs(ref).max() + 1e-30)
    np.testing.assert_allclose(np.asarray(y, np.float64), ref, rtol=0, atol=bound)


def test_fp8_codes_are_ml_dtypes_casts():
    x, w = _inputs(outliers=False)
    r = R.FP8Current()
    y = jaxq.ops.dot_general(x, w, DN, recipe=r)
    xs = float(np.abs(x).max()) / 448.0
    ws = float(np.abs(w).max()) / 448.0
    xq = (np.asarray(x) / np.float32(xs)).astype(ml_dtypes.float8_e4m3fn).astype(np.float64) * xs
    wq = (np.asarray(w) / np.float32(ws)).astype(ml_dtypes.float8_e4m3fn).astype(np.float64) * ws
    # The scales may differ from amax/448 by an ulp (jaxq's scales are fixed points of
    # re-quantization), which can flip a rare code exactly at a rounding boundary.
    err = np.linalg.norm(np.asarray(y) - xq @ wq) / np.linalg.norm(xq @ wq)
    assert err < 1e-3


# Relative L2 error of (dx, dw) against float32, measured on these inputs (outlier
# channels in x), with a margin of about 1.5x. Per-tensor FP8 suffers most from the
# outlier channels; block scales do better.
BACKWARD_BUDGET = {
    "fp8_current": 0.10, "fp8_delayed": 0.10, "fp8_static": 0.10, "fp8_blockwise": 0.06,
    "mxfp8": 0.07, "mxfp4": 0.30, "nvfp4": 0.25, "int8": 0.06, "int4": 0.25,
    "ternary": 0.06,
}  # fmt: skip
# Ternary's dx carries the ternary weight (about 50% off by construction): budget on dw.


def _rel(a, b):
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


@pytest.mark.sweep
@pytest.mark.parametrize("name", sorted(BACKWARD_BUDGET))
def test_backward_error_budget(name):
    x, w = _inputs()
    r = R.NAMED[name]()
    s = _state(r)
    steps = R.init_steps(r, x, w, DN)
    g = jax.random.normal(jax.random.key(SEED), (x.shape[0], w.shape[1]))

    def f(x, w):
        return jnp.sum(jaxq.ops.dot_general(x, w, DN, recipe=r, state=s, steps=steps) * g)

    dx, dw = jax.jit(jax.grad(f, argnums=(0, 1)))(x, w)
    dx_ref, dw_ref = g @ w.T, x.T @ g
    budget = BACKWARD_BUDGET[name]
    if name == "ternary":
        assert _rel(dw, dw_ref) < budget
    elif name == "int4":  # weight-only: dw differs only where LSQ clips (zero gradient)
        assert _rel(dx, dx_ref) < budget
        assert _rel(dw, dw_ref) < 0.01
    else:
        assert _rel(dx, dx_ref) < budget, _rel(dx, dx_ref)
        assert _rel(dw, dw_ref) < budget, _rel(dw, dw_ref)


def test_qat_gradients_equal_fake_quant_gradients():
    x, w = _inputs()
    r = R.Int8()
    g = jax.random.normal(jax.random.key(1), (x.shape[0], w.shape[1]))

    def ours(x, w):
        return jnp.sum(jaxq.ops.dot_general(x, w, DN, recipe=r) * g)

    def fake(x, w):
        xq = jaxq.fake_quant(x, "int8", axis=0)
        wq = jaxq.fake_quant(w, "int8", axis=1)
        return jnp.sum(jnp.dot(xq, wq, precision="highest") * g)

    a = jax.grad(ours, argnums=(0, 1))(x, w)
    b = jax.grad(fake, argnums=(0, 1))(x, w)
    for u, v in zip(a, b, strict=True):
        np.testing.assert_allclose(u, v, rtol=2e-5, atol=2e-5 * float(jnp.abs(v).max()))


def test_learned_step_gradients_match_lsq():
    x, w = _inputs(k=256)
    r = R.Int4(block_size=128)
    steps = R.init_steps(r, x, w, DN)

    def ours(w, s):
        return jnp.sum(jaxq.ops.dot_general(x, w, DN, recipe=r, steps={"lhs": None, "rhs": s})
                       ** 2)  # fmt: skip

    def ref(w, s):  # canonical weight (1, N, K) in groups of 128, LSQ from the foundation
        wt = w.T.reshape(1, w.shape[1], 2, 128)
        wq = jaxq.lsq_quant(wt, s, "int4").reshape(1, w.shape[1], 256)[0].T
        return jnp.sum(jnp.dot(x, wq, precision="highest") ** 2)

    a = jax.grad(ours, argnums=(0, 1))(w, steps["rhs"])
    b = jax.grad(ref, argnums=(0, 1))(w, steps["rhs"])
    for u, v in zip(a, b, strict=True):
        np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-4 * float(jnp.abs(v).max()))


@pytest.mark.sweep
@pytest.mark.parametrize(
    "lhs_shape, rhs_shape, dn",
    [
        ((2, 16, 64), (64, 32), (((2,), (0,)), ((), ()))),  # Dense on (batch, seq, d)
        ((4, 8, 64), (4, 64, 16), (((2,), (1,)), ((0,), (0,)))),  # batched
        ((64, 8), (32, 64), (((0,), (1,)), ((), ()))),  # transposed operands
        ((2, 16, 4, 16), (4, 16, 32), (((2, 3), (0, 1)), ((), ()))),  # two contracting axes
    ],
)
@pytest.mark.parametrize("name", ["fp8_current", "mxfp8", "int8"])
def test_general_dimension_numbers(lhs_shape, rhs_shape, dn, name):
    rng = np.random.default_rng(SEED)
    x = jnp.asarray(rng.standard_normal(lhs_shape), jnp.float32)
    w = jnp.asarray(rng.standard_normal(rhs_shape), jnp.float32)
    r = R.NAMED[name]()
    y = jaxq.ops.dot_general(x, w, dn, recipe=r)
    ref = jax.lax.dot_general(x, w, dn, precision="highest")
    assert y.shape == ref.shape and y.dtype == ref.dtype
    assert _rel(y, ref) < 0.08
    dx, dw = jax.grad(lambda x, w: jnp.sum(jaxq.ops.dot_general(x, w, dn, recipe=r) * ref),
                      argnums=(0, 1))(x, w)  # fmt: skip
    rx, rw = jax.grad(lambda x, w: jnp.sum(jax.lax.dot_general(x, w, dn) * ref),
                      argnums=(0, 1))(x, w)  # fmt: skip
    assert dx.shape == x.shape and dw.shape == w.shape
    assert _rel(dx, rx) < 0.12 and _rel(dw, rw) < 0.12


def test_bfloat16_operands_keep_their_dtype():
    x, w = _inputs()
    xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
    r = R.FP8Current()
    y = jaxq.ops.dot_general(xb, wb, DN, recipe=r)
    assert y.dtype == jnp.bfloat16
    y32 = jaxq.ops.dot_general(xb, wb, DN, recipe=r, preferred_element_type=jnp.float32)
    assert y32.dtype == jnp.float32
    dx, dw = jax.grad(lambda a, b: jaxq.ops.dot_general(a, b, DN, recipe=r).astype(
        jnp.float32).sum(), argnums=(0, 1))(xb, wb)  # fmt: skip
    assert dx.dtype == jnp.bfloat16 and dw.dtype == jnp.bfloat16


def test_compute_paths():
    x, w = _inputs()
    x3, w3 = x[None], w.T[None]
    from jaxq.ops.operand import quantize_operand

    def path(qa, qb):
        return jaxq.ops.compute_path(quantize_operand(x3, qa), quantize_operand(w3, qb))

    assert path(Quantizer("e4m3"), Quantizer("e4m3", "row")) == "fp8"
    assert path(Quantizer("int8", "row"), Quantizer("int4", "row")) == "int"
    assert path(Quantizer("e4m3", "block", 128), Quantizer("e4m3")) == "dequantize"
    assert path(None, Quantizer("int4", "block", 64)) == "dequantize"


def test_int8_path_accumulates_in_int32_exactly():
    # K = 4096 of code products 127 * 127: float32 accumulation would round, int32 does not.
    k = 4096
    x = jnp.full((1, k), 1.0, jnp.float32)
    w = jnp.full((k, 1), 1.0, jnp.float32).at[0, 0].set(1.0 + 1 / 254)
    r = Recipe("i8", Quantizer("int8", "row"), Quantizer("int8", "row"), None)
    y = jaxq.ops.dot_general(x, w, DN, recipe=r)
    sw = np.float32(1.0 + 1 / 254) / np.float32(127)  # one scale for the weight column
    codes = np.full(k, round(1.0 / float(sw)), np.int64)
    codes[0] = 127
    expect = float(np.sum(codes * 127)) * (1.0 / 127) * float(sw)
    assert abs(float(y[0, 0]) - expect) <= 2e-7 * expect


def test_w4a8_mixed_formats():
    x, w = _inputs()
    r = Recipe("w4a8", Quantizer("e4m3"), Quantizer("int4", "block", 128), None)
    y = jaxq.ops.dot_general(x, w, DN, recipe=r)
    ref = _deq(x, "e4m3") @ _deq(w.T, "int4", block_size=128).T
    np.testing.assert_allclose(np.asarray(y, np.float64), ref, rtol=0,
                               atol=1e-5 * np.abs(ref).max())  # fmt: skip


def test_weight_only_keeps_activations():
    x, w = _inputs()
    r = R.WeightOnly("int4", block_size=64)
    y = jaxq.ops.dot_general(x, w, DN, recipe=r)
    ref = np.asarray(x, np.float64) @ _deq(w.T, "int4", block_size=64).T
    np.testing.assert_allclose(np.asarray(y, np.float64), ref, rtol=0,
                               atol=1e-5 * np.abs(ref).max())  # fmt: skip


@pytest.mark.sweep
@pytest.mark.parametrize("name", ["fp8_current", "fp8_blockwise", "mxfp8", "nvfp4"])
def test_residuals_are_quantized(name):
    x = jax.ShapeDtypeStruct((256, 512), jnp.float32)
    w = jax.ShapeDtypeStruct((512, 512), jnp.float32)
    r = R.NAMED[name]()
    frac = jaxq.ops.residual_nbytes(r, x, w, DN) / ((256 + 512) * 512 * 4)
    limit = {"fp8_current": 0.26, "fp8_blockwise": 0.55, "mxfp8": 0.55, "nvfp4": 0.30}[name]
    assert frac <= limit, frac


def test_misaligned_small_shapes_run():
    # Dimensions that no FP8 GEMM takes (not multiples of 16) use the same codes in float32.
    rng = np.random.default_rng(SEED)
    x = jnp.asarray(rng.standard_normal((3, 7)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((7, 5)), jnp.float32)
    y = jaxq.ops.dot_general(x, w, DN, recipe=R.FP8Current())
    ref = _deq(x, "e4m3") @ _deq(w, "e4m3")
    np.testing.assert_allclose(np.asarray(y, np.float64), ref, rtol=1e-5, atol=1e-6)
    jax.grad(lambda x: jaxq.ops.dot_general(x, w, DN, recipe=R.FP8Current()).sum())(x)


def test_token_axis_not_multiple_of_block_is_padded_in_backward():
    x, w = _inputs(m=50)  # 50 tokens: not a multiple of 128 (blockwise) or 16 (Hadamard)
    for r in (R.NVFP4(),):  # 16-point Hadamard and 1x16 blocks along the token axis
        s = _state(r)
        dw = jax.grad(lambda w, r=r, s=s: jnp.sum(
            jaxq.ops.dot_general(x, w, DN, recipe=r, state=s) ** 2))(w)  # fmt: skip
        ref = jax.grad(lambda w: jnp.sum((x @ w) ** 2))(w)
        assert _rel(dw, ref) < 0.3


def test_nan_gradient_propagates_and_never_enters_history():
    x, w = _inputs()
    r = R.FP8Delayed(history_length=4)
    s = r.init()

    def loss(w, s):
        y = jaxq.ops.dot_general(x, w, DN, recipe=r, state=s)
        return jnp.sum(y.at[0, 0].multiply(jnp.nan))

    grads, obs = jax.grad(loss, argnums=(0, 1))(w, s)
    assert not np.isfinite(np.asarray(grads)).all()  # the step sees the NaN
    new = R.update(s, obs)
    assert np.isfinite(np.asarray(new.grad_history)).all()
    assert float(new.grad_history[0]) > 0  # the finite part of the gradient was recorded


def test_stochastic_rounding_changes_with_the_step_and_is_unbiased():
    x, w = _inputs()
    r = R.MXFP4()
    s = r.init(jax.random.key(0))

    g = jax.random.normal(jax.random.key(SEED), (x.shape[0], w.shape[1]))

    def dw(s):
        return jax.grad(lambda w: jnp.sum(jaxq.ops.dot_general(x, w, DN, recipe=r, state=s) * g))(w)

    s2 = R.update(s, jax.tree.map(jnp.zeros_like, s))
    a, b = dw(s), dw(s2)
    assert not np.array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(dw(s)))  # deterministic per key


def test_hadamard_rotation_in_wgrad_leaves_exact_product():
    # With no quantizer, the rotated weight gradient equals the plain one.
    x, w = _inputs(m=64)
    r = Recipe("rot", None, None, None, hadamard_wgrad=True)
    s = r.init(jax.random.key(3))
    g = jax.grad(lambda w: jnp.sum(jaxq.ops.dot_general(x, w, DN, recipe=r, state=s) ** 2))(w)
    ref = jax.grad(lambda w: jnp.sum(jnp.dot(x, w, precision="highest") ** 2))(w)
    np.testing.assert_allclose(g, ref, rtol=1e-4, atol=1e-4 * float(jnp.abs(ref).max()))


def test_partial_drops_into_flax_linear():
    from flax import nnx

    dot = functools.partial(jaxq.ops.dot_general, recipe=R.FP8Current())
    layer = nnx.Linear(64, 32, dot_general=dot, rngs=nnx.Rngs(0))
    x = jnp.ones((4, 64))
    y = layer(x)
    g = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(layer)
    assert y.shape == (4, 32) and np.isfinite(np.asarray(g["kernel"].value)).all()


@pytest.mark.parametrize("fmt", ["mxfp8", "mxfp4", "nvfp4"])
def test_scaled_matmul_operands_follow_its_definition(fmt):
    # jax.nn.scaled_matmul has a kernel on Blackwell GPUs only; its documented definition
    # is checked here against the dequantize path, so both paths give the same values
    # up to float32 summation order.
    from jaxq.ops.operand import matmul, quantize_operand, scaled_matmul_operands

    x, w = _inputs()
    qa = quantize_operand(x[None], Quantizer(fmt, "block"))
    qb = quantize_operand(w.T[None], Quantizer(fmt, "block"))
    la, lb, sa, sb, post = scaled_matmul_operands(qa, qb)
    bs = la.shape[-1] // sa.shape[-1]
    a = la.astype(jnp.float32) * jnp.repeat(sa.astype(jnp.float32), bs, axis=-1)
    b = lb.astype(jnp.float32) * jnp.repeat(sb.astype(jnp.float32), bs, axis=-1)
    by_definition = jnp.einsum("bmk,bnk->bmn", a, b, precision="highest") * post
    ref = matmul(qa, qb)
    np.testing.assert_allclose(by_definition, ref, rtol=1e-5,
                               atol=1e-5 * float(jnp.abs(ref).max()))  # fmt: skip


@pytest.mark.parametrize("name", ["fp8_current", "mxfp8", "nvfp4"])
def test_float_backward_operands_multiply_the_quantized_gradient_by_float_operands(name):
    # ∂x = Q_g(g) · wᵀ and ∂w = xᵀ · Q_g(g), each Q_g along that product's contraction,
    # against float64 products of the dequantized gradient and the unquantized operands.
    x, w = _inputs(m=64, k=128, n=96)
    kw = {"random_hadamard": False, "stochastic_rounding_grads": False} if name == "nvfp4" else {}
    r = R.NAMED[name](backward_operands="float", **kw)
    assert r.backward_quantizer("lhs") is None and r.backward_quantizer("rhs") is None
    s = _state(r)
    g = jax.random.normal(jax.random.key(SEED), (x.shape[0], w.shape[1]))
    f = jax.jit(jax.grad(lambda x, w: jnp.sum(
        jaxq.ops.dot_general(x, w, DN, recipe=r, state=s) * g), argnums=(0, 1)))  # fmt: skip
    dx, dw = f(x, w)
    deq = {"fp8_current": lambda a: _deq(a, "e5m2"), "mxfp8": lambda a: _mx_up(a, "mxfp8"),
           "nvfp4": lambda a: _deq(a, "nvfp4")}[name]  # fmt: skip
    gd = deq(g)  # blocks along N: the input gradient's contraction
    gtd = deq(g.T)  # blocks along M (tokens): the weight gradient's contraction
    x64, w64 = np.asarray(x, np.float64), np.asarray(w, np.float64)
    np.testing.assert_allclose(dx, gd @ w64.T, rtol=1e-4, atol=1e-4 * np.abs(gd @ w64.T).max())
    np.testing.assert_allclose(dw, x64.T @ gtd.T, rtol=1e-4,
                               atol=1e-4 * np.abs(x64.T @ gtd.T).max())  # fmt: skip
    # The forward is the recipe's own; the residuals are the float operands.
    y_float = jaxq.ops.dot_general(x, w, DN, recipe=r, state=s)
    y_quant = jaxq.ops.dot_general(x, w, DN, recipe=R.NAMED[name](**kw), state=s)
    np.testing.assert_array_equal(y_float, y_quant)
    xs, ws = (jax.ShapeDtypeStruct(a.shape, a.dtype) for a in (x, w))
    assert jaxq.ops.residual_nbytes(r, xs, ws, DN) == (x.size + w.size) * 4


def test_float_backward_operands_need_a_quantized_gradient():
    with pytest.raises(ValueError, match="needs a quantized gradient"):
        Recipe("qat", Quantizer("int8", "row"), Quantizer("int8", "row"), None,
               backward_operands="float")  # fmt: skip
    with pytest.raises(ValueError, match="backward_operands must be"):
        R.FP8Current(backward_operands="fp32")


def test_float_backward_operands_in_a_convolution():
    rng = np.random.default_rng(SEED)
    x = jnp.asarray(rng.standard_normal((2, 8, 8, 4)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 3, 4, 16)) * 0.2, jnp.float32)
    g = jnp.asarray(rng.standard_normal((2, 8, 8, 16)), jnp.float32)
    dn = ("NHWC", "HWIO", "NHWC")
    r = R.FP8Current(backward_operands="float")

    def ours(x, w):
        return jaxq.ops.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=dn,
                                             recipe=r)  # fmt: skip

    def conv(x, w):
        return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=dn,
                                            precision="highest")  # fmt: skip

    _, vjp = jax.vjp(ours, x, w)
    _, vjp_ref = jax.vjp(conv, x, w)  # the float operands, the E5M2 gradient
    for a, b in zip(vjp(g), vjp_ref(jaxq.dequantize(jaxq.quantize(g, "e5m2"))), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(jnp.abs(b).max()))


@pytest.mark.parametrize("name", ["mxfp8", "mxfp4"])
def test_mx_scale_rounding_up_never_saturates_and_ocp_follows_the_spec(name):
    # A block whose amax lies just under the next power of two: 1.9 * 2^k. OCP's
    # 2^(floor(log2 amax) - emax) makes it 1.9 * 2^emax > max, which saturates; rounding
    # the scale up keeps it.
    rng = np.random.default_rng(SEED)
    x = rng.standard_normal((4, 64)).astype(np.float32)
    x[:, 0] = 1.9 * 2.0 ** rng.integers(4, 24, 4)  # the amax of its block
    x[0, 32:] = 0.0  # an all-zero block
    x[1, 40] = 1.0e38  # a block near the float32 max
    xj = jnp.asarray(x)
    q = {"mxfp8": "mxfp8", "mxfp4": "mxfp4"}[name]
    up = quantize_operand(xj[None], Quantizer(q, "block", power_of_two=True))
    ocp = quantize_operand(xj[None], Quantizer(q, "block"))
    np.testing.assert_array_equal(np.asarray(jaxq.dequantize(up), np.float64)[0], _mx_up(x, name))
    np.testing.assert_array_equal(np.asarray(jaxq.dequantize(ocp))[0], _deq(x, q))
    top = 448.0 if name == "mxfp8" else 6.0
    e_up = np.asarray(up.scale.astype(jnp.float32))[0, :, 0]
    assert np.all(np.abs(x[:, 0]) <= top * e_up), "round-up scales never saturate"
    assert np.all(np.abs(np.asarray(jaxq.dequantize(ocp))[0, :, 0]) < np.abs(x[:, 0]))
    with pytest.raises(ValueError, match="power_of_two does not apply"):
        Quantizer("nvfp4", "block", power_of_two=True)
    with pytest.raises(ValueError, match="scale_rounding"):
        R.MXFP8(scale_rounding="down")


@pytest.mark.parametrize("recipe", [
    R.MXFP8(), R.MXFP8(backward_operands="float"),
    R.NVFP4(random_hadamard=False, stochastic_rounding_grads=False),  # no random bits
    R.FP8Blockwise(block_size=32),
], ids=["mxfp8", "mxfp8_float_bwd", "nvfp4_no_hadamard", "fp8_blockwise"])  # fmt: skip
def test_token_axis_blocks_in_place_equal_the_transposed_weight_gradient(recipe, monkeypatch):
    """The weight gradient's 1 x b blocks along the tokens, formed in place, give the codes
    and scales of quantizing the transposed operands (so the same product), ragged tokens
    included."""
    import sys

    dg = sys.modules["jaxq.ops.dot_general"]
    x = jax.random.normal(jax.random.key(0), (2, 50, 64)) * 3  # 100 tokens: padded to 128
    w = jax.random.normal(jax.random.key(1), (64, 96))
    g = jax.random.normal(jax.random.key(2), (2, 50, 96))
    dn = (((2,), (0,)), ((), ()))
    state = recipe.init(jax.random.key(3)) if recipe.needs_key else None

    def grads():
        f = lambda x, w: jaxq.ops.dot_general(x, w, dn, recipe=recipe, state=state)  # noqa: E731
        return jax.jit(lambda x, w: jax.vjp(f, x, w)[1](g))(x, w)

    assert dg._wgrad_in_place(dg._Config(recipe, None, None, None, "t"))
    dx, dw = grads()
    monkeypatch.setattr(dg, "_wgrad_in_place", lambda cfg: False)
    dx_t, dw_t = grads()
    np.testing.assert_array_equal(dx, dx_t)
    scale = np.abs(np.asarray(dw_t)).max()
    np.testing.assert_allclose(dw, dw_t, rtol=0, atol=1e-5 * scale)



@pytest.mark.parametrize("fa, fb, gran", [
    ("e5m2", "e4m3", "tensor"),  # FP8 codes with tensor scales: multiplied as codes
    ("e4m3", "e4m3", "block"),  # block scales: dequantized values
    (None, "int8", "row"),  # a float operand
], ids=["fp8_tensor", "fp8_block", "float_x_int8"])  # fmt: skip
def test_contract_equals_the_canonical_product_without_transposes(fa, fb, gran):
    """``operand.contract`` contracts any pair of axes as the operands lie: the float64
    product of the dequantized operands within float32 rounding, and ``matmul`` of the
    transposed operands to the same bound."""
    from jaxq.ops import operand as O

    rng = np.random.default_rng(SEED)
    g = (rng.standard_normal((1, 96, 64)) * 1e-3).astype(np.float32)  # (B, M, N)
    x = rng.standard_normal((1, 96, 128)).astype(np.float32)  # (B, M, K)
    x[..., 5] *= 40.0  # an outlier channel
    w = (rng.standard_normal((1, 64, 128)) * 0.05).astype(np.float32)  # (B, N, K)

    def q(v, f):
        return jnp.asarray(v) if f is None else quantize_operand(
            jnp.asarray(v), Quantizer(f, gran, 32 if gran == "block" else None))  # fmt: skip

    def f64(v):
        return np.asarray(O.to_float(v), np.float64)

    a = q(g, fa)
    for b, axes, spec in [(q(x, fb), (1, 1), "bmn,bmk->bnk"),  # the weight gradient
                          (q(w, fb), (2, 1), "bmn,bnk->bmk")]:  # the input gradient
        got = np.asarray(O.contract(a, b, axes))
        ref = np.einsum(spec, f64(a), f64(b))
        mag = np.einsum(spec, np.abs(f64(a)), np.abs(f64(b)))
        assert got.shape == ref.shape
        assert np.all(np.abs(got - ref) <= 1e-5 * mag)
        canon = O.matmul(O.transpose(a), O.transpose(b)) if axes == (1, 1) else O.matmul(
            a, O.transpose(b))  # fmt: skip
        assert np.all(np.abs(got - np.asarray(canon)) <= 2e-5 * mag)
    # integer codes on both sides need the canonical layout (the int8 x int8 -> int32 GEMM)
    ia = quantize_operand(jnp.asarray(g), Quantizer("int8", "row"))
    ib = quantize_operand(jnp.asarray(w.transpose(0, 2, 1)), Quantizer("int8", "row"))
    assert O.contract(ia, ib, (2, 2)) is None


@pytest.mark.parametrize("fmt, bs", [("mxfp8", None), ("mxfp4", None), ("nvfp4", None),
                                     ("int4", 32), ("e4m3", 16)])  # fmt: skip
def test_transpose_keeps_codes_blocked_along_the_rows_exactly(fmt, bs):
    """Blocks along the rows become blocks along the contraction of the transposed operand,
    as codes (sub-byte codes repacked along the new last axis): the same values exactly,
    odd widths, zeros, huge values and non-finite entries included."""
    from jaxq.ops import operand as O

    rng = np.random.default_rng(SEED)
    x = rng.standard_normal((1, 64, 33)).astype(np.float32) * 2.0 ** rng.integers(-20, 20, 33)
    x[0, :32, 0] = 0.0  # a zero block
    x[0, 3, 1], x[0, 40, 2], x[0, 7, 3] = 3e38, 1e-40, -np.inf
    x[0, 9, 4] = np.nan
    q = quantize_operand(jnp.asarray(x), Quantizer(fmt, "block", bs), axis=1)
    t = O.transpose(q)
    assert isinstance(t, jaxq.QArray) and t.shape == (1, 33, 64)
    assert t.layout.kind == "block" and t.layout.axes == (2,) and t.packed == q.packed
    np.testing.assert_array_equal(np.asarray(O.to_float(t)),
                                  np.asarray(O.to_float(q)).transpose(0, 2, 1))  # fmt: skip


@pytest.mark.parametrize("fmt, tile", [("nvfp4", 16), ("e4m3", 32), ("int8", 16)])
def test_transpose_tiles_is_the_transposed_operand_in_blocks_along_its_rows(fmt, tile):
    """An operand quantized in square tiles, transposed: blocks of the tile along the new
    contraction axis with the tile's scale, the same values exactly."""
    from jaxq.ops import operand as O

    rng = np.random.default_rng(SEED + 1)
    w = rng.standard_normal((1, 64, 96)).astype(np.float32)
    w[0, :16, :16] *= 1e4  # tiles of very different magnitudes
    w[0, 16:32, 32:48] = 0.0
    w[0, 33, 50] = 1e-42
    q = quantize_operand(jnp.asarray(w), Quantizer(fmt, "block2d", tile))
    t = O.transpose_tiles(q, tile)
    assert t.shape == (1, 96, 64) and t.layout.axes == (2,) and t.layout.block_size == tile
    assert t.scale.shape == (1, 96, 64 // tile)
    np.testing.assert_array_equal(np.asarray(O.to_float(t)),
                                  np.asarray(O.to_float(q)).transpose(0, 2, 1))  # fmt: skip
