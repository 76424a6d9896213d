"""GPTQ: agreement with a float64 column-by-column reference, gains over round-to-nearest,
act-order, singular Hessians, the returned QArray's structure, and input validation."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxq import formats as F
from jaxq.ops import Quantizer
from jaxq.ops.operand import matmul, quantize_operand
from jaxq.ptq.gptq_solver import GPTQResult, gptq
from jaxq.quantization import packing
from jaxq.quantization.codes import decode, encode
from jaxq.quantization.qarray import dequantize

T, K, N = 512, 256, 64

INT4_ROW = Quantizer("int4", "row")
INT4_G32 = Quantizer("int4", "block", block_size=32)
INT4_G128 = Quantizer("int4", "block", block_size=128)
NF4_G64 = Quantizer("nf4", "block", block_size=64)
INT2_ROW = Quantizer("int2", "row")
MXFP4 = Quantizer("mxfp4", "block")
NVFP4 = Quantizer("nvfp4", "block")


def correlated_x(seed, t=T, k=K, rank=16, noise=0.3, outliers=0):
    """Activations with a low-rank + noise structure (and optionally outlier channels)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(t, rank)) @ rng.normal(size=(rank, k)) + noise * rng.normal(size=(t, k))
    if outliers:
        idx = rng.choice(k, outliers, replace=False)
        x[:, idx] *= rng.uniform(10, 30, size=outliers)
    return x.astype(np.float32)


def weight(seed, n=N, k=K):
    return np.random.default_rng(seed + 100).normal(size=(n, k)).astype(np.float32)


def hessian(x):
    x64 = x.astype(np.float64)
    return (2 * x64.T @ x64).astype(np.float32)


@functools.cache
def data(seed=0):
    x = correlated_x(seed)
    return x, weight(seed), hessian(x)


@functools.cache
def run(q, act_order=False, seed=0):
    x, w, h = data(seed)
    return gptq(w, h, q, act_order=act_order)


def deq(qarr):
    return np.asarray(dequantize(qarr, jnp.float32))[0].astype(np.float64)


def rtn(w, q):
    return deq(quantize_operand(jnp.asarray(w)[None], q))


def out_err(x, w, qw):
    x = x.astype(np.float64)
    return np.linalg.norm(x @ w.astype(np.float64).T - x @ qw.T)


# ---------------------------------------------------------------- float64 reference


def _grid(fmt):
    if isinstance(fmt, F.BlockFormat):
        fmt = fmt.element
    return np.asarray(fmt.values(), np.float64)  # ascending, both signs


def _round_to(y, grid):
    """Nearest grid value (saturating); ties to the lower value."""
    return grid[np.argmin(np.abs(y[..., None] - grid), axis=-1)]


def _scales(wg, fmt):
    """Per-row scale of a group (N, g): absmax / max, or the MX power of two."""
    a = np.max(np.abs(wg), axis=1)
    if isinstance(fmt, F.BlockFormat):  # MX: 2^(floor(log2 amax) - emax_elem)
        e = np.floor(np.log2(np.where(a > 0, a, 1.0))) - fmt.element.emax
        return np.where(a > 0, 2.0**e, 1.0)
    return np.where(a > 0, a / fmt.max, 1.0)


def reference_gptq(w, h, q, *, damp=0.01, act_order=False):
    """The paper's algorithm, unblocked, column by column, in float64."""
    w = w.astype(np.float64).copy()
    h = h.astype(np.float64).copy()
    h = (h + h.T) / 2
    k = w.shape[1]
    gs = q.block_size if q.granularity == "block" else k
    grid = _grid(q.fmt)
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    static = act_order or q.granularity == "row"
    if static:  # scale of every column, from the original weights
        col_scale = np.repeat(
            np.stack([_scales(w[:, g : g + gs], q.fmt) for g in range(0, k, gs)], 1), gs, 1
        )
    perm = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(k)
    w, h = w[:, perm], h[perm][:, perm]
    if static:
        col_scale = col_scale[:, perm]
    h += damp * np.mean(np.diag(h)) * np.eye(k)
    u = np.linalg.cholesky(np.linalg.inv(h)).T  # upper, uᵀu = h⁻¹
    qv = np.zeros_like(w)
    for i in range(k):
        if static:
            s = col_scale[:, i]
        elif i % gs == 0:
            s = _scales(w[:, i : i + gs], q.fmt)
        qv[:, i] = s * _round_to(w[:, i] / s, grid)
        err = (w[:, i] - qv[:, i]) / u[i, i]
        w[:, i + 1 :] -= np.outer(err, u[i, i + 1 :])
    return qv[:, np.argsort(perm)]


def _sweep(*values):
    """A case the newest-JAX pass of make test leaves out (it runs int4 g32)."""
    return pytest.param(*values, marks=pytest.mark.sweep)


@pytest.mark.parametrize(
    "q, act_order",
    [
        _sweep(INT4_ROW, False),
        (INT4_G32, False),
        _sweep(INT4_G128, False),
        _sweep(NF4_G64, False),
        _sweep(INT2_ROW, False),
        _sweep(MXFP4, False),
        (INT4_G32, True),
    ],
    ids=["int4-row", "int4-g32", "int4-g128", "nf4-g64", "int2-row", "mxfp4", "int4-g32-ao"],
)
def test_matches_float64_reference(q, act_order):
    x, w, h = data()
    ref = reference_gptq(w, h, q, act_order=act_order)
    got = deq(run(q, act_order).qarray)
    # Codes agree almost everywhere: they can differ only where float32 and float64 land
    # on opposite sides of a rounding boundary, and GPTQ's error feedback then carries the
    # difference along the rest of that row. So whole rows agree, all but a few (measured:
    # all rows, or one of 64 on a CPU whose float32 arithmetic rounded one value across).
    same = np.isclose(got, ref, rtol=1e-3, atol=1e-6)
    assert same.all(axis=1).mean() >= 0.95, (same.all(axis=1).mean(), same.mean())
    # ... and the layer outputs agree to 1 %.
    e_got, e_ref = out_err(x, w, got), out_err(x, w, ref)
    assert abs(e_got - e_ref) < 0.01 * e_ref, (e_got, e_ref)


# ---------------------------------------------------------------- gains over RTN


@pytest.mark.parametrize(
    "q",
    [_sweep(INT4_ROW), INT4_G32, _sweep(INT4_G128), _sweep(NF4_G64), _sweep(INT2_ROW),
     _sweep(MXFP4)],
    ids=["int4-row", "int4-g32", "int4-g128", "nf4-g64", "int2-row", "mxfp4"],
)
def test_beats_round_to_nearest(q):
    x, w, _ = data()
    r = run(q)
    e_gptq, e_rtn = out_err(x, w, deq(r.qarray)), out_err(x, w, rtn(w, q))
    # measured ratios on these data: 0.20 - 0.23 (int2: 0.225)
    assert e_gptq < 0.5 * e_rtn, (e_gptq, e_rtn)
    # the reported proxy losses are 2 ‖X ΔWᵀ‖² of the result and of RTN
    np.testing.assert_allclose(float(r.error), 2 * e_gptq**2, rtol=1e-3)
    np.testing.assert_allclose(float(r.rtn_error), 2 * e_rtn**2, rtol=1e-3)


def test_act_order_helps_with_outlier_channels():
    ratios = []
    for seed in range(3):
        x = correlated_x(seed + 10, outliers=8)
        w, h = weight(seed), hessian(x)
        plain = gptq(w, h, INT4_G32).error
        ordered = gptq(w, h, INT4_G32, act_order=True).error
        ratios.append(float(ordered) / float(plain))
    assert np.mean(ratios) < 1.0, ratios  # measured: 0.05, 0.26, 0.18


# ---------------------------------------------------------------- singular Hessians


def _check_finite(r, w):
    q = deq(r.qarray)
    assert np.all(np.isfinite(q)) and np.isfinite(float(r.error))
    assert float(r.error) <= float(r.rtn_error) * (1 + 1e-5)
    return q


def test_singular_hessians_give_finite_results():
    x, w, _ = data()
    # all-zero input columns: dead inputs, their weights quantize to zero
    xz = x.copy()
    xz[:, :5] = 0
    q = _check_finite(gptq(w, hessian(xz), INT4_G32), w)
    np.testing.assert_array_equal(q[:, :5], 0)
    # duplicated columns (rank deficient)
    xd = x.copy()
    xd[:, 128:] = xd[:, :128]
    _check_finite(gptq(w, hessian(xd), INT4_G32), w)
    # fewer tokens than inputs
    _check_finite(gptq(w, hessian(x[:64]), INT4_G32), w)


def test_undamped_singular_hessian_retries_with_damping():
    x, w, _ = data()
    r = gptq(w, hessian(x[:64]), INT4_G32, damp=0.0)
    _check_finite(r, w)
    assert float(r.damping) > 0
    assert float(gptq(w, np.zeros((K, K), np.float32), INT4_G32).error) == 0.0


# ---------------------------------------------------------------- the QArray


@pytest.mark.parametrize(
    "q",
    [INT4_ROW, INT4_G32, NF4_G64, MXFP4, NVFP4, Quantizer("e4m3", "tensor")],
    ids=["int4-row", "int4-g32", "nf4", "mx", "nv", "fp8-tensor"],
)
def test_qarray_has_quantize_operand_structure(q):
    _, w, h = data()
    want = quantize_operand(jnp.asarray(w)[None], q)
    # shapes and dtypes by tracing only; the numbers of the compiled cases below
    got = jax.eval_shape(lambda w, h: gptq(w, h, q, act_order=True).qarray, w, h)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
    if q in (INT4_ROW, INT4_G32, NF4_G64, MXFP4):
        got = run(q).qarray.validate()
        assert jax.tree.structure(got) == jax.tree.structure(want)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            assert a.shape == b.shape and a.dtype == b.dtype


@pytest.mark.parametrize("q", [INT4_G32, NF4_G64], ids=["int4-g32", "nf4-g64"])
def test_values_lie_on_the_format_grid(q):
    """Requantizing the dequantized weight with its own scales gives back its codes."""
    r = run(q).qarray
    elem = q.fmt
    values = dequantize(r, jnp.float32).reshape(N, K // q.block_size, q.block_size)
    scale = r.scale.reshape(N, -1, 1)
    codes = packing.unpack(r.codes, bits=elem.bits, n=K).reshape(values.shape)
    np.testing.assert_array_equal(encode(values / scale, elem), codes)
    np.testing.assert_array_equal(decode(codes, elem) * scale, values)


def test_serving_matmul_uses_the_result():
    x, _, _ = data()
    r = run(INT4_ROW).qarray
    a = quantize_operand(jnp.asarray(x[:16])[None], Quantizer("int8", "row"))
    got = np.asarray(matmul(a, r))[0]
    want = deq(a) @ deq(r).T
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)


def test_jit_and_dtype():
    _, w, h = data()
    shapes = jax.eval_shape(lambda w, h: gptq(w, h, INT4_ROW), w, h)
    assert isinstance(shapes, GPTQResult) and shapes.qarray.shape == (1, N, K)
    w16 = jnp.asarray(w, jnp.bfloat16)
    assert jax.eval_shape(lambda w: gptq(w, h, INT4_ROW), w16).qarray.dtype == jnp.bfloat16


# ---------------------------------------------------------------- validation


# fmt: off
@pytest.mark.parametrize(
    "args, kwargs, exc, match",
    [
        ((np.ones(8), np.eye(8), INT4_ROW), {}, ValueError, r"w must be 2-D.*\(8,\)"),
        ((np.ones((2, 8)), np.eye(4), INT4_ROW), {}, ValueError, r"hessian must have shape"),
        ((np.ones((2, 8)), np.eye(8), "int4"), {}, TypeError, "quantizer must be"),
        ((np.ones((2, 8), np.int32), np.eye(8), INT4_ROW), {}, TypeError, "w must be a float"),
        ((np.ones((2, 48)), np.eye(48), INT4_G32), {}, ValueError, "group size 32 .* K = 48"),
        ((np.ones((2, 8)), np.eye(8), Quantizer("int4", "block2d", block_size=8)), {},
         ValueError, "block2d"),
        ((np.ones((2, 8)), np.eye(8), Quantizer("int8", scaling="delayed")), {},
         ValueError, "delayed"),
        ((np.ones((2, 8)), np.eye(8), Quantizer("int4", rounding="stochastic")), {},
         ValueError, "rounding"),
        ((np.ones((2, 32)), np.eye(32), INT4_G32), {"act_order": True, "static_groups": False},
         ValueError, "static_groups"),
        ((np.ones((2, 8)), np.eye(8) * np.nan, INT4_ROW), {}, ValueError, r"hessian of shape"),
        ((np.full((2, 8), np.inf), np.eye(8), INT4_ROW), {}, ValueError, r"w of shape \(2, 8\)"),
        ((np.ones((2, 8)), -np.eye(8), INT4_ROW), {}, ValueError, "negative diagonal"),
        ((np.ones((2, 8)), np.eye(8), INT4_ROW), {"damp": -1.0}, ValueError, "damp"),
        ((np.ones((2, 8)), np.eye(8), INT4_ROW), {"block_size": 0}, ValueError, "block_size"),
    ],
)
# fmt: on
def test_bad_inputs(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        gptq(*args, **kwargs)
