"""SmoothQuant and AWQ scales: exactness of the rescaling, outlier reduction, quantized
error against plain quantization, non-finite activations and input validation."""

import functools

import jax.numpy as jnp
import numpy as np
import pytest

from jaxq.ops import Quantizer
from jaxq.ops.operand import matmul, quantize_operand
from jaxq.ptq.smoothing import activation_absmax, awq_clip, awq_scales, smoothquant_scales
from jaxq.quantization.qarray import dequantize

T, K, N = 256, 256, 64
INT4_G128 = Quantizer("int4", "block", block_size=128)


@functools.cache
def outlier_data(seed=0, n_out=4, gain=40.0):
    """Activations with a few large (salient) channels, as in LLM hidden states."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(T, K))
    idx = rng.choice(K, n_out, replace=False)
    x[:, idx] *= gain
    w = rng.normal(size=(N, K)) / np.sqrt(K)
    return x.astype(np.float32), w.astype(np.float32)


def deq(q):
    return np.asarray(dequantize(q, jnp.float32))[0].astype(np.float64)


def out_err(x, w, w_hat, x_hat=None):
    x64 = x.astype(np.float64)
    x_hat = x64 if x_hat is None else x_hat
    return np.linalg.norm(x64 @ w.astype(np.float64).T - x_hat @ w_hat.T)


# ---------------------------------------------------------------- SmoothQuant


def test_smoothquant_rescaling_is_exact_in_float64():
    x, w = outlier_data()
    s = np.asarray(smoothquant_scales(activation_absmax(x), w), np.float64)
    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    np.testing.assert_allclose((x64 / s) @ (w64 * s).T, x64 @ w64.T, rtol=1e-11, atol=1e-11)


def test_smoothquant_formula_and_degenerate_channels():
    a = jnp.array([16.0, 0.0, 4.0, jnp.inf, 1e30], jnp.float32)
    w = jnp.array([[1.0, 2.0, 0.0, 1.0, 1e-30], [-4.0, 1.0, 0.0, 1.0, 1.0]], jnp.float32)
    s = np.asarray(smoothquant_scales(a, w, alpha=0.5))
    assert s[0] == pytest.approx(np.sqrt(16.0) / np.sqrt(4.0))
    assert s[1] == s[2] == s[3] == 1.0  # zero activation, zero weights, non-finite statistic
    assert s[4] == pytest.approx(1e5)  # clipped
    np.testing.assert_allclose(smoothquant_scales(a[:1], w[:, :1], alpha=1.0), [16.0])
    np.testing.assert_allclose(smoothquant_scales(a[:1], w[:, :1], alpha=0.0), [1 / 4.0])


def _spread(x):
    """Largest channel range over the mean channel range."""
    r = np.max(np.abs(x), axis=0)
    return r.max() / r.mean()


def test_smoothquant_reduces_activation_outliers():
    x, w = outlier_data()
    s = np.asarray(smoothquant_scales(activation_absmax(x), w))
    before, after = _spread(x), _spread(x / s)
    assert after < 0.3 * before, (before, after)  # measured: 29 -> 6


def test_smoothquant_w8a8_error_is_smaller():
    x, w = outlier_data()
    s = np.asarray(smoothquant_scales(activation_absmax(x), w))
    act, wq = Quantizer("int8"), Quantizer("int8", "row")

    def w8a8(xs, ws):
        out = matmul(quantize_operand(jnp.asarray(xs)[None], act),
                     quantize_operand(jnp.asarray(ws)[None], wq))  # fmt: skip
        return np.linalg.norm(np.asarray(out[0], np.float64) - x.astype(np.float64) @ w.T)

    plain, smooth = w8a8(x, w), w8a8(x / s, w * s)
    assert smooth < 0.5 * plain, (plain, smooth)  # measured ratio: ~0.2


# ---------------------------------------------------------------- AWQ


def test_awq_never_worse_than_rtn_and_better_on_salient_channels():
    x, w = outlier_data()
    s, info = awq_scales(x, w, INT4_G128)
    losses = np.asarray(info.losses)
    assert losses.shape == (20,) and float(info.grid[0]) == 0.0
    assert float(info.loss) == losses.min() <= losses[0]
    # losses[0] is round-to-nearest
    rtn = out_err(x, w, deq(quantize_operand(jnp.asarray(w)[None], INT4_G128)))
    np.testing.assert_allclose(losses[0], rtn**2, rtol=1e-3)
    # and the returned scales reproduce the reported loss
    s = np.asarray(s)
    w_hat = deq(quantize_operand(jnp.asarray(w * s)[None], INT4_G128))
    awq = out_err(x, w, w_hat, x.astype(np.float64) / s)
    np.testing.assert_allclose(awq**2, float(info.loss), rtol=1e-3)
    assert awq < 0.8 * rtn, (awq, rtn)  # measured ratio: ~0.5
    assert float(info.best) > 0
    np.testing.assert_allclose(np.sqrt(s.max() * s.min()), 1.0, rtol=1e-5)


def test_awq_picks_plain_rtn_when_nothing_helps():
    """Constant activations: every channel has the same statistic, so all a give s = 1."""
    x = np.ones((8, K), np.float32)
    _, w = outlier_data()
    s, info = awq_scales(x, w, INT4_G128)
    np.testing.assert_allclose(np.asarray(s), 1.0, rtol=1e-6)
    assert float(info.best) == 0.0


def test_awq_ignores_non_finite_tokens():
    x, w = outlier_data()
    bad = x.copy()
    bad[3, 5], bad[7, 0] = np.nan, np.inf
    s_bad, info_bad = awq_scales(bad, w, INT4_G128)
    assert np.all(np.isfinite(np.asarray(s_bad))) and np.isfinite(float(info_bad.loss))
    # the loss leaves the two tokens out: at a = 0 (RTN) it is the loss without them
    keep = np.ones(T, bool)
    keep[[3, 7]] = False
    _, info_ref = awq_scales(x[keep], w, INT4_G128)
    np.testing.assert_allclose(info_bad.losses[0], info_ref.losses[0], rtol=1e-5)
    # the statistic mean |x_k| is over the finite entries of each channel
    m = np.nanmean(np.abs(np.where(np.isfinite(bad), bad, np.nan)), axis=0)
    want = m ** float(info_bad.best)
    want /= np.sqrt(want.max() * want.min())
    np.testing.assert_allclose(np.asarray(s_bad), want, rtol=1e-4)
    np.testing.assert_allclose(activation_absmax(bad)[5], np.abs(np.delete(x[:, 5], 3)).max())


def test_awq_clip_never_worse_and_quantizes_as_chosen():
    x, w = outlier_data()
    s, _ = awq_scales(x, w, INT4_G128)
    xs, ws = x / np.asarray(s), w * np.asarray(s)
    wc, info = awq_clip(xs, ws, INT4_G128, grid=10)
    assert info.best.shape == (N, K // 128)
    assert float(info.loss) <= float(info.losses[0])
    w_hat = deq(quantize_operand(jnp.asarray(wc)[None], INT4_G128))
    np.testing.assert_allclose(out_err(xs, ws, w_hat) ** 2, float(info.loss), rtol=1e-3)


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda: smoothquant_scales(np.ones(4), np.ones((2, 5))), ValueError, "act_absmax"),
        (lambda: smoothquant_scales(np.ones((4, 1)), np.ones((2, 4))), ValueError, "act_absmax"),
        (lambda: smoothquant_scales(np.ones(4), np.ones(4)), ValueError, r"w must have shape"),
        (lambda: smoothquant_scales(np.ones(4), np.ones((2, 4)), 1.5), ValueError, "alpha"),
        (lambda: awq_scales(np.ones((3, 4)), np.ones((2, 5)), INT4_G128), ValueError, "x has 4"),
        (lambda: awq_scales(np.ones(4), np.ones((2, 4)), INT4_G128), ValueError, r"x must"),
        (lambda: awq_scales(np.ones((3, 64)), np.ones((2, 64)), INT4_G128), ValueError,
         "block size 128"),
        (lambda: awq_scales(np.ones((3, 4)), np.ones((2, 4)), "int4"), TypeError, "quantizer"),
        (lambda: awq_scales(np.ones((3, 4)), np.ones((2, 4)), Quantizer("int4", "row"), grid=0),
         ValueError, "grid"),
        (lambda: awq_clip(np.ones((3, 4)), np.ones((2, 4)), Quantizer("int4", "row"),
                          max_shrink=1.0), ValueError, "max_shrink"),
        (lambda: activation_absmax(np.ones((2, 2), np.int32)), TypeError, "floating"),
    ],
)  # fmt: skip
def test_bad_inputs(call, exc, match):
    with pytest.raises(exc, match=match):
        call()
