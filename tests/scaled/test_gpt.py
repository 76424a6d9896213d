"""The test that matters: a GPT block under ``scalify(jax.value_and_grad(loss))`` in FP8.

Weights and activations are stored in E4M3 and gradients in E5M2 (see ``_gpt.py``).

(a) Loss and every gradient match the float32 run within the FP8 error budget below.
    Measured on this block (seed 0): loss relative error 0.4%, gradient relative L2
    error 7%-21% per tensor (median 13%), the same as plain FP8 casts of the unscaled
    block at unit scale (max 20%), because at unit scale both cast the same numbers.
    Budget: loss 2%, each gradient 30% relative L2, and the scalified FP8 gradients at
    least as accurate as the plain FP8 ones (ratio of errors at most 1.25).
(b) Multiplying the embeddings by 2^20 or 2^-20 changes only scales: every output's data
    is bit-identical and the loss is unchanged, while the plain FP8 casts of the same block
    saturate (2^20: over 99% of embedding values clip at 448, so the embedding gradients are
    those of the clipped values, off by a factor of over 100) or underflow (2^-20: the
    embeddings flush to zero in E4M3 and the loss is NaN).
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from jaxq.formats import E4M3, E5M2
from jaxq.scaled import as_scaled_array, asarray, is_scaled, scalify

from . import _gpt as G

LOSS_BUDGET = 0.02
GRAD_BUDGET = 0.30


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _scaled_params(p, k=0):
    return {n: as_scaled_array(v * 2.0**k if n in ("tok", "pos") else v) for n, v in p.items()}


@pytest.fixture(scope="module")
def run():
    p = G.init(jax.random.key(0))
    toks = G.tokens(jax.random.key(1))
    ref = jax.jit(jax.value_and_grad(G.make_loss(False)))(p, toks)
    fp8 = jax.jit(scalify(jax.value_and_grad(G.make_loss(True))))
    out = {k: fp8(_scaled_params(p, k), toks) for k in (0, 20, -20)}
    plain = jax.jit(jax.value_and_grad(G.make_loss(True)))
    plain_out = {k: plain({n: v * 2.0**k if n in ("tok", "pos") else v for n, v in p.items()},
                          toks) for k in (0, 20, -20)}  # fmt: skip
    return p, toks, ref, out, plain_out


def test_stored_formats(run):
    """Weights are E4M3 values; every gradient's data is exactly representable in E5M2."""
    p, _, _, out, _ = run
    for v in p.values():
        sa = as_scaled_array(v)
        stored = sa.data.astype(E4M3.dtype)  # storage: one byte per element
        assert stored.dtype == np.dtype(E4M3.dtype)
    _, grads = out[0]
    for name, g in grads.items():
        assert is_scaled(g), name
        np.testing.assert_array_equal(g.data, g.data.astype(E5M2.dtype).astype(g.data.dtype))


def test_fp8_matches_float32_within_budget(run):
    _, _, (ref_loss, ref_grads), out, plain_out = run
    loss, grads = out[0]
    assert abs(float(asarray(loss)) - float(ref_loss)) / abs(float(ref_loss)) < LOSS_BUDGET
    errs = {n: _rel(asarray(grads[n]), ref_grads[n]) for n in ref_grads}
    plain_errs = {n: _rel(plain_out[0][1][n], ref_grads[n]) for n in ref_grads}
    assert max(errs.values()) < GRAD_BUDGET, errs
    assert np.median(list(errs.values())) < 0.2, errs
    assert max(errs.values()) <= 1.25 * max(plain_errs.values()), (errs, plain_errs)


def test_scalify_float32_is_exact():
    """Without casts, the scalified step equals the float32 step to rounding."""
    p = G.init(jax.random.key(0))
    toks = G.tokens(jax.random.key(1))
    ref_loss, ref_grads = jax.value_and_grad(G.make_loss(False))(p, toks)
    loss, grads = scalify(jax.value_and_grad(G.make_loss(False)))(_scaled_params(p, 7), toks)
    np.testing.assert_allclose(asarray(loss), ref_loss, rtol=1e-5)
    for n in ref_grads:
        want = ref_grads[n] * (2.0**-7 if n in ("tok", "pos") else 1.0)
        assert _rel(asarray(grads[n]), want) < 1e-5, n


@pytest.mark.parametrize("k", [20, -20])
def test_input_scale_changes_only_scales(run, k):
    _, _, (ref_loss, ref_grads), out, plain_out = run
    (loss0, grads0), (loss, grads) = out[0], out[k]
    np.testing.assert_array_equal(loss.data, loss0.data)
    assert float(loss.scale) == float(loss0.scale)
    for n in grads0:
        np.testing.assert_array_equal(grads[n].data, grads0[n].data, err_msg=n)
        ratio = 2.0**-k if n in ("tok", "pos") else 1.0
        assert float(grads[n].scale) == float(grads0[n].scale) * ratio, n
    # the same FP8 casts without scale propagation break down
    plain_loss, plain_grads = plain_out[k]
    if k > 0:  # values overflow E4M3 and saturate; their gradients flush to zero in E5M2
        emb = np.asarray(G.init(jax.random.key(0))["tok"]) * 2.0**k
        cast = np.clip(emb, -E4M3.max, E4M3.max).astype(E4M3.dtype).astype(np.float32)
        assert np.mean(np.abs(cast) == E4M3.max) > 0.99  # nearly every value saturates
        for n in ("tok", "pos"):  # gradients of the clipped values, not of the true ones
            assert _rel(plain_grads[n], ref_grads[n] * 2.0**-k) > 100, n
    else:  # embeddings underflow E4M3 to zero: LayerNorm of zeros
        assert not np.isfinite(float(plain_loss))
