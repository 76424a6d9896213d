"""Gradients of a two-layer float16/FP8 transformer under ``scalify`` (``_tfm.py``).

The promise, against float32 gradients of the same function on the same (rounded)
parameters:

* float16 data: loss within 1e-3 and every gradient within 1% relative L2 error, with
  the layers under ``lax.scan`` or unrolled, with and without ``jax.checkpoint``, under
  ``jit``; every gradient's data stays in unit range (RMS within 2^+-4).
* FP8 (E4M3 forward, E5M2 gradients at every weight and matmul input, float16 data):
  loss within 2% and every gradient within the FP8 budget of 25% relative L2, and no
  more than 1.25x the error of the same casts applied to the float32 model at unit
  scale (E4M3 has 3 mantissa bits: one cast has up to 6.25% relative error, and the
  gradients measured here are 9-16% off, as with the plain casts).
* multiplying the embedding scale by 2^20 or 2^-20 leaves every output's data bit for
  bit unchanged (only the scales move), where the plain FP8 casts saturate or flush.

Inputs are drawn fresh on each run; the seed is printed on failure and can be fixed
with ``JAXQ_TEST_SEED``.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxq.scaled import as_scaled_array, asarray, cast_on_backward, cast_on_forward, scalify

from . import _tfm as M

SEED = int(os.environ.get("JAXQ_TEST_SEED", np.random.SeedSequence().entropy % 2**31))
FP16_BUDGET = 0.01
FP8_BUDGET = 0.25
WHERE = f"(seed {SEED}; rerun with JAXQ_TEST_SEED={SEED})"


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _fp8(x, kind):
    return cast_on_backward(cast_on_forward(x, "e4m3"), "e5m2")


@pytest.fixture(scope="module")
def inputs():
    k1, k2 = jax.random.split(jax.random.key(SEED))
    p16 = {k: v.astype(jnp.float16) for k, v in M.init(k1).items()}
    p32 = {k: v.astype(jnp.float32) for k, v in p16.items()}  # the same values
    return p16, p32, M.tokens(k2)


@pytest.fixture(scope="module")
def reference(inputs):
    _, p32, toks = inputs
    return jax.jit(jax.value_and_grad(M.make_loss(scan=False)))(p32, toks)


@pytest.mark.parametrize("scan", [True, False], ids=["scan", "unrolled"])
@pytest.mark.parametrize("remat", [False, True], ids=["plain", "remat"])
def test_float16_gradients_match_float32(inputs, reference, scan, remat):
    p16, _, toks = inputs
    ref_loss, ref_grads = reference
    step = jax.jit(scalify(jax.value_and_grad(M.make_loss(scan=scan, remat=remat))))
    loss, grads = step({k: as_scaled_array(v) for k, v in p16.items()}, toks)
    assert abs(float(asarray(loss, jnp.float32)) / float(ref_loss) - 1) < 1e-3, WHERE
    errs = {n: _rel(asarray(grads[n], jnp.float32), ref_grads[n]) for n in ref_grads}
    assert max(errs.values()) < FP16_BUDGET, (errs, WHERE)
    for n, g in grads.items():
        assert g.dtype == jnp.float16, n
        rms = float(jnp.sqrt(jnp.mean(jnp.square(g.data.astype(jnp.float32)))))
        assert 2.0**-4 <= rms <= 2.0**4, (n, rms, WHERE)


@pytest.fixture(scope="module")
def fp8_runs(inputs):
    """The FP8 model with an eps-free embedding norm, at embedding scales 2^0, 2^+-20."""
    p16, p32, toks = inputs
    loss_fn = M.make_loss(scan=True, cast=_fp8, emb_norm=True)
    step = jax.jit(scalify(jax.value_and_grad(loss_fn)))
    runs = {}
    for k in (0, 20, -20):
        params = {n: as_scaled_array(v) for n, v in p16.items()}
        e = params["emb"]
        params["emb"] = type(e)(e.data, e.scale * 2.0**k)
        runs[k] = step(params, toks)
    ref = jax.jit(jax.value_and_grad(M.make_loss(scan=False, emb_norm=True)))(p32, toks)
    plain = jax.jit(jax.value_and_grad(loss_fn))
    plain_runs = {
        k: plain({**p32, "emb": p32["emb"] * 2.0**k}, toks) for k in (0, 20, -20)
    }
    return runs, ref, plain_runs


def test_fp8_gradients_within_budget(fp8_runs):
    runs, (ref_loss, ref_grads), plain_runs = fp8_runs
    loss, grads = runs[0]
    assert abs(float(asarray(loss, jnp.float32)) / float(ref_loss) - 1) < 0.02, WHERE
    errs = {n: _rel(asarray(grads[n], jnp.float32), ref_grads[n]) for n in ref_grads}
    plain = {n: _rel(plain_runs[0][1][n], ref_grads[n]) for n in ref_grads}
    assert max(errs.values()) < FP8_BUDGET, (errs, WHERE)
    assert max(errs.values()) <= 1.25 * max(plain.values()), (errs, plain, WHERE)


@pytest.mark.parametrize("k", [20, -20])
def test_input_scale_moves_only_scales(fp8_runs, k):
    runs, (ref_loss, ref_grads), plain_runs = fp8_runs
    (loss0, grads0), (loss, grads) = runs[0], runs[k]
    np.testing.assert_array_equal(loss.data, loss0.data)
    assert float(loss.scale) == float(loss0.scale)
    for n in grads0:
        np.testing.assert_array_equal(grads[n].data, grads0[n].data, err_msg=n)
        want = np.asarray(grads0[n].scale) * (2.0**-k if n == "emb" else 1.0)
        np.testing.assert_array_equal(grads[n].scale, want, err_msg=n)
    # the same casts on plain values saturate (2^20) or flush to zero (2^-20)
    plain_loss, plain_grads = plain_runs[k]
    if k > 0:
        assert _rel(plain_grads["emb"], ref_grads["emb"] * 2.0**-k) > 0.5
    else:
        broken = not np.isfinite(float(plain_loss))
        assert broken or _rel(plain_grads["wqkv"], ref_grads["wqkv"]) > 0.5


@pytest.mark.parametrize(
    "fn",
    [lambda x, w: jnp.mean(jax.nn.softmax(x @ w) ** 2), lambda x, w: jnp.mean(jnp.tanh(x @ w))],
    ids=["softmax", "tanh"],
)
@pytest.mark.parametrize("shape", [(32, 64, 48), (256, 128, 512)])
def test_float16_softmax_gradients(fn, shape):
    m, k, n = shape
    kx, kw = jax.random.split(jax.random.key(SEED + m))
    x = jax.random.normal(kx, (m, k)).astype(jnp.float16)
    w = (jax.random.normal(kw, (k, n)) / np.sqrt(k)).astype(jnp.float16)
    grad = jax.grad(fn, argnums=(0, 1))
    want = grad(x.astype(jnp.float32), w.astype(jnp.float32))
    got = scalify(grad)(as_scaled_array(x), as_scaled_array(w))
    for g, r in zip(got, want, strict=True):
        assert _rel(asarray(g, jnp.float32), r) < 5e-3, WHERE


def test_mean_cotangent_enters_the_scale():
    """The 1/N of a mean's cotangent goes into the scale: 2^-20-sized float16 gradients."""
    x = jax.random.normal(jax.random.key(SEED), (1024, 1024)).astype(jnp.float16)
    g = scalify(jax.grad(lambda a: jnp.mean(a * a)))(as_scaled_array(x))
    want = 2 * x.astype(np.float32) / x.size  # about 2^-19: below float16's subnormals
    assert _rel(asarray(g, jnp.float32), want) < 1e-3, WHERE
    # Nothing underflows because of the 1/N: a zero may only come from x's own last bit
    # (the scaled sum of the two x*ct terms halves each, and 2^-25 rounds to 0 in float16).
    zero = np.asarray(g.data) == 0
    tiny = np.abs(np.asarray(x, np.float32)) <= 2.0**-24
    assert not (zero & ~tiny).any(), WHERE
