"""jaxq.ops' quantizers on the fused quantization kernels, run in interpret mode on CPU.

``JAXQ_KERNELS=interpret`` makes :func:`jaxq.ops.operand.quantize_operand` hand FP8
tensor-scaled, MXFP8, MXFP4 and NVFP4 quantizers to the fused Pallas quantizers where they
compute exactly what ``jaxq.quantize`` computes; everything else stays on XLA. The QArrays
must be XLA's bit for bit (NaN codes equal as NaN), and so the products and gradients (up
to the order XLA:CPU sums a float32 product in).
The products are kept on XLA here (their kernels agree within a tolerance, not bit for bit;
``test_ops_dispatch`` tests them).
"""

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxq
from jaxq import recipes as R
from jaxq.ops import OpState, Quantizer, Recipe
from jaxq.ops import operand as O
from jaxq.ops.kernel_dispatch import kernel_quantize
from jaxq.quantization.calibration import MSE

DN = (((2,), (0,)), ((), ()))
SEED = np.random.SeedSequence().entropy % 2**31

CT, MX8, MX4, NV4 = ("jaxq_cast_transpose", "jaxq_mxfp8_quantize", "jaxq_mxfp4_quantize",
                     "jaxq_nvfp4_quantize")  # fmt: skip
ROUTED = {
    # E4M3 forward, E5M2 gradient, one tensor scale each: current and delayed scaling
    "fp8_current": (R.FP8Current(), CT),
    "fp8_delayed": (R.FP8Delayed(history_length=4), CT),
    # OCP block scales (the default rounds them up, which stays on XLA)
    "mxfp8": (R.MXFP8(scale_rounding="ocp"), MX8),
    "mxfp4": (R.MXFP4(stochastic_rounding_grads=False, scale_rounding="ocp"), MX4),
    "nvfp4": (R.NVFP4(random_hadamard=False, stochastic_rounding_grads=False,
                      weight_blocks_2d=False), NV4),  # fmt: skip
}


def _bits(a):
    return np.atleast_1d(np.asarray(a)).view(np.uint8)


def assert_same_qarray(got, want):
    """Field by field: metadata equal, codes and scales bit for bit (NaN codes as NaN)."""
    assert isinstance(got, jaxq.QArray) and isinstance(want, jaxq.QArray)
    assert (got.fmt, got.shape, got.dtype, got.layout) == (want.fmt, want.shape, want.dtype,
                                                           want.layout)  # fmt: skip
    for field in ("codes", "scale", "zero_point", "tensor_scale"):
        a, b = getattr(got, field), getattr(want, field)
        assert (a is None) == (b is None), field
        if a is None:
            continue
        assert (a.shape, a.dtype) == (b.shape, b.dtype), field
        keep = np.ones(_bits(a).shape, bool)
        if field == "codes" and a.dtype.itemsize == 1 and jnp.issubdtype(a.dtype, jnp.floating):
            nan_a, nan_b = np.isnan(np.asarray(a, np.float32)), np.isnan(np.asarray(b, np.float32))
            np.testing.assert_array_equal(nan_a, nan_b)  # E5M2 NaN payloads may differ
            keep = ~np.atleast_1d(nan_a)
        np.testing.assert_array_equal(_bits(a)[keep], _bits(b)[keep], err_msg=field)


def assert_same_product(got, want, abs_sum):
    """The same products of the same quantized operands: non-finite entries equal, finite
    ones within ``2^-14 Σ|a·b|``. XLA:CPU may lay out an operand's codes differently when
    a kernel rather than an XLA fusion writes them, and then sums the float32 products in
    another order (a few ulps of ``Σ|a·b|``); one differing FP8 or FP4 code would move the
    entry by a fraction of one term, ``Σ|a·b| / K`` (K <= 64 here), far more."""
    got, want, abs_sum = np.asarray(got), np.asarray(want), np.asarray(abs_sum)
    finite = np.isfinite(got) & np.isfinite(want)
    np.testing.assert_array_equal(got[~finite], want[~finite])
    bound = np.where(np.isfinite(abs_sum), abs_sum, np.inf) * 2.0**-14
    assert np.all(np.abs(got - want)[finite] <= bound[finite])
    assert np.mean(got[finite] == want[finite]) > 0.9  # mostly bit for bit


def _edges(x, at):
    """Zero row, a huge value, an inf and a NaN, at positions of the leading rows."""
    r, c = at
    return (x.at[..., 0, :].set(0.0).at[..., 1, c].set(3e4).at[..., r, 2].set(jnp.inf)
            .at[..., r + 1, c + 1].set(jnp.nan))  # fmt: skip


def _interpret(monkeypatch):
    monkeypatch.setenv("JAXQ_KERNELS", "interpret")
    jax.clear_caches()  # the choice is made when traced: forget the XLA traces


def _both(fn, monkeypatch, *args):
    """``fn(*args)`` under ``jit`` on XLA and in interpret mode, and the latter's jaxpr."""
    monkeypatch.delenv("JAXQ_KERNELS", raising=False)
    jax.clear_caches()
    want = jax.jit(fn)(*args)
    assert "pallas_call" not in str(jax.make_jaxpr(fn)(*args))  # CPU: XLA, unchanged
    _interpret(monkeypatch)
    return want, jax.jit(fn)(*args), str(jax.make_jaxpr(fn)(*args))


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2", "mxfp8", "mxfp4", "nvfp4"])
def test_quantize_operand_is_the_xla_qarray(fmt, monkeypatch):
    rng = np.random.default_rng(SEED)
    block = fmt not in ("e4m3", "e5m2")
    q = Quantizer(fmt, "block" if block else "tensor")
    x = jnp.asarray(rng.standard_normal((1, 21, 96)) * 5, jnp.float32)
    x = _edges(x, (4, 40)).astype(jnp.bfloat16 if fmt == "mxfp4" else jnp.float32)
    zeros = jnp.zeros((1, 5, 32), jnp.float32)

    def f(x, zeros):
        out = [O.quantize_operand(x, q), O.quantize_operand(zeros, q)]
        if not block:  # delayed: history amaxes below, above and at zero (the current amax)
            dq = dataclasses.replace(q, scaling="delayed", margin=1)
            out += [O.quantize_operand(x, dq, amax=a) for a in (jnp.float32(2.0),
                                                                jnp.float32(1e9), 0.0)]
        return out

    want, got, jaxpr = _both(f, monkeypatch, x, zeros)
    assert (CT if not block else f"jaxq_{fmt}_quantize") in jaxpr
    for g, w in zip(got, want, strict=True):
        assert_same_qarray(g, w)
    # the cast-transpose kernel's second output: the transposed codes, the same scale
    both = O.quantize_operand_and_transpose(x, q)
    assert_same_qarray(both[0], want[0])
    if block:
        assert both[1] is None
    else:
        assert_same_qarray(both[1], O.transpose(want[0]))


def assert_same_step_products(got, want, x, w, gy):
    """y, dx and dw of a layer step against XLA's, each within its own ``Σ|a·b|`` bound."""
    ax, aw, ag = jnp.abs(x), jnp.abs(w), jnp.abs(gy)
    sums = [jnp.einsum("bmk,kn->bmn", ax, aw, precision="highest"),
            jnp.einsum("bmn,kn->bmk", ag, aw, precision="highest"),
            jnp.einsum("bmk,bmn->kn", ax, ag, precision="highest")]  # fmt: skip
    for g, v, s in zip(got[:3], want[:3], sums, strict=True):
        assert_same_product(g, v, s)


def _step(recipe, x, w, gy, state):
    def f(x, w, state):
        return jaxq.ops.dot_general(x, w, DN, recipe=recipe, state=state)

    y, vjp = jax.vjp(f, x, w, state)
    return (y, *vjp(gy))


@pytest.mark.parametrize("name", sorted(ROUTED))
def test_products_and_gradients_are_the_xla_ones(name, monkeypatch):
    recipe, kernel_name = ROUTED[name]
    # the products' own kernels agree within a tolerance: keep them on XLA
    monkeypatch.setattr(O, "kernel_product", lambda a, b: None)
    rng = np.random.default_rng(SEED)
    x = _edges(jnp.asarray(rng.standard_normal((2, 13, 64)), jnp.float32), (3, 20))
    w = jnp.asarray(rng.standard_normal((64, 48)) * 0.1, jnp.float32)
    gy = jnp.asarray(rng.standard_normal((2, 13, 48)), jnp.float32).at[0, 5, 7].set(2e4)
    state = recipe.init()
    if name == "fp8_delayed":  # histories that clip x, cover w, and a zero one (current)
        state = OpState(lhs_history=jnp.array([1.5, 0.5, 0, 0]),
                        rhs_history=jnp.array([0.0, 0.4, 0, 0]), grad_history=jnp.zeros(4))
    want, got, jaxpr = _both(lambda x, w, s: _step(recipe, x, w, gy, s), monkeypatch, x, w, state)
    # forward operands, the gradient, and the re-quantized operands along K where the
    # backward blocks them so (the token-axis blocks of the weight gradient stay on XLA)
    assert jaxpr.count(kernel_name) >= 3, jaxpr.count(kernel_name)
    assert_same_step_products(got, want, x, w, gy)
    for g, v in zip(jax.tree.leaves(got[3]), jax.tree.leaves(want[3]), strict=True):
        np.testing.assert_array_equal(g, v)  # the observed amaxes


@pytest.mark.parametrize("name", ["fp8_current", "fp8_delayed"])
def test_the_backward_reads_the_cast_transpose_copies(name, monkeypatch):
    """Tensor-scaled FP8: the backward products contract x, w and the gradient along their
    other axis. Where the GEMM needs them transposed (a GPU's FP8 GEMM; here ``contract``
    declines as it does there), XLA transposes the codes; the cast-transpose kernel wrote
    those copies already, so no code is transposed again, and the gradients are XLA's."""
    recipe = ROUTED[name][0]
    monkeypatch.setattr(O, "kernel_product", lambda a, b: None)
    monkeypatch.setattr(O, "contract", lambda a, b, axes: None)
    transposed = []
    transpose = O.transpose

    def counting(x):
        transposed.append((os.environ.get("JAXQ_KERNELS"), isinstance(x, jaxq.QArray)))
        return transpose(x)

    monkeypatch.setattr(O, "transpose", counting)
    rng = np.random.default_rng(SEED)
    x = _edges(jnp.asarray(rng.standard_normal((3, 11, 64)), jnp.float32), (2, 9))
    w = jnp.asarray(rng.standard_normal((64, 40)) * 0.1, jnp.float32)
    gy = jnp.asarray(rng.standard_normal((3, 11, 40)), jnp.float32)
    state = recipe.init()
    want, got, jaxpr = _both(lambda x, w, s: _step(recipe, x, w, gy, s), monkeypatch, x, w, state)
    # x and w in the forward, the gradient in the backward (one ``name=`` per call)
    assert jaxpr.count(f"name={CT}") == 3, jaxpr.count(f"name={CT}")
    on_xla = [q for mode, q in transposed if mode is None]
    on_kernels = [q for mode, q in transposed if mode == "interpret"]
    assert sum(on_xla) >= 3 and sum(on_xla) % 3 == 0 and sum(on_kernels) == 0, transposed
    assert_same_step_products(got, want, x, w, gy)


def test_what_stays_on_xla(monkeypatch):
    _interpret(monkeypatch)
    rng = np.random.default_rng(SEED)
    x = jnp.asarray(rng.standard_normal((1, 8, 64)), jnp.float32)
    key = jax.random.key(0)
    stays = [
        (x, Quantizer("e4m3", rounding="stochastic"), {"key": key}),
        (x, Quantizer("mxfp4", "block", rounding="stochastic"), {"key": key}),
        (x, Quantizer("e4m3", calibration=MSE()), {}),
        (x, Quantizer("nvfp4", "block", calibration=MSE()), {}),
        (x, Quantizer("e4m3", power_of_two=True), {}),
        (x, Quantizer("mxfp8", "block", power_of_two=True), {}),  # MXFP8() rounds up
        (x, Quantizer("e4m3", "row"), {}),
        (x, Quantizer("e4m3", "block", 32), {}),
        (x, Quantizer("int8"), {}),
        (x, Quantizer("int2", calibration="absmean"), {}),
        (jnp.concatenate([x, x]), Quantizer("e4m3"), {}),  # B > 1
        (jnp.concatenate([x, x]), Quantizer("nvfp4", "block"), {}),
        (jnp.tile(x, (1, 4, 1)), Quantizer("mxfp8", "block"), {"axis": 1}),  # along rows
    ]
    for operand, q, kw in stays:
        assert kernel_quantize(operand, q, axis=kw.get("axis", 2)) is None, q
        jaxpr = str(jax.make_jaxpr(lambda v, q=q, kw=kw: O.quantize_operand(v, q, **kw))(operand))
        assert "pallas_call" not in jaxpr, q
    assert kernel_quantize(x, Quantizer("e4m3"), amax=jnp.ones((1, 8, 1))) is None
    assert kernel_quantize(x.astype(jnp.float16), Quantizer("e4m3")) is not None
    # whole recipes: stochastic rounding, MSE calibration, rounded-up MX scales, B > 1
    rng_recipe = Recipe("mixed", Quantizer("e4m3", rounding="stochastic"),
                        Quantizer("e4m3", calibration=MSE()), Quantizer("e5m2", "row"))
    w = jnp.asarray(rng.standard_normal((64, 32)), jnp.float32)
    for recipe, kernel in ((rng_recipe, CT), (R.MXFP8(), MX8), (R.MXFP4(), MX4)):
        state = recipe.init(jax.random.key(1) if recipe.needs_key else None)
        step = functools.partial(_step, recipe, gy=jnp.ones((1, 8, 32)), state=state)
        assert kernel not in str(jax.make_jaxpr(step)(x, w)), recipe.name
    xb = jnp.stack([x[0], x[0]])  # a batched product: (2, 8, 64) x (2, 64, 32)
    f = lambda x, w: jaxq.ops.einsum("bmk,bkn->bmn", x, w, recipe=R.FP8Current())  # noqa: E731
    assert CT not in str(jax.make_jaxpr(f)(xb, jnp.stack([w, w])))


def test_xla_forced_keeps_the_quantizers_on_xla(monkeypatch):
    monkeypatch.setenv("JAXQ_KERNELS", "xla")
    x = jnp.ones((1, 8, 64))
    assert kernel_quantize(x, Quantizer("nvfp4", "block")) is None
    assert "pallas_call" not in str(jax.make_jaxpr(O.quantize_operand, static_argnums=1)(
        x, Quantizer("e4m3")))  # fmt: skip


def test_differentiating_the_quantizer_gives_the_xla_derivative(monkeypatch):
    """A Pallas call has no derivative rule: the kernel's result carries the XLA
    quantizer's tangents, so a derivative through quantize_operand is XLA's, and vmap
    batches the kernel."""
    rng = np.random.default_rng(SEED)
    x = jnp.asarray(rng.standard_normal((1, 6, 32)), jnp.float32)
    q, nv = Quantizer("e4m3", scaling="delayed"), Quantizer("nvfp4", "block")

    def values(x, a):
        y = jaxq.dequantize(O.quantize_operand(x, q, amax=a), jnp.float32)
        return y * x, jaxq.dequantize(O.quantize_operand(x * a, nv), jnp.float32)

    def f(x, a):  # a reduction's order may differ between programs: only its derivative
        y, z = values(x, a)
        return jnp.sum(y) + jnp.sum(z)

    def derivatives(x, a):
        _, tangent = jax.jvp(values, (x, a), (jnp.ones_like(x), jnp.float32(1.0)))
        vm = jax.vmap(lambda v: O.quantize_operand(v[None], nv))(x[0].reshape(2, 3, 32))
        return (jax.grad(f, argnums=(0, 1))(x, a), tangent), vm

    want, got, jaxpr = _both(derivatives, monkeypatch, x, jnp.float32(1.5))
    assert CT in jaxpr and NV4 in jaxpr
    # the same terms; autodiff may add a cotangent's contributions in another order
    for g, v in zip(jax.tree.leaves(got[0]), jax.tree.leaves(want[0]), strict=True):
        g, v = np.asarray(g), np.asarray(v)
        np.testing.assert_array_equal(np.isfinite(g), np.isfinite(v))  # NaN/inf where XLA's
        finite = np.isfinite(v)
        big = float(np.max(np.abs(v[finite]), initial=0.0))
        np.testing.assert_allclose(g[finite], v[finite], rtol=1e-6, atol=1e-6 * big)
    assert jax.tree.structure(got[1]) == jax.tree.structure(want[1])  # vmapped QArrays
    for g, v in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1]), strict=True):
        assert (g.shape, g.dtype) == (v.shape, v.dtype)
        np.testing.assert_array_equal(_bits(g), _bits(v))
