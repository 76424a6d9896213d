"""Static-scale FP8 matmul (E4M3 forward, E5M2 backward) and FP8 training of a
unit-scaled decoder without any dynamic scaling."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from conftest import normals
from flax import nnx

import jaxq
from jaxq import data, formats
from jaxq.unit_scaling import (
    Fp8DotGeneral,
    TransformerDecoder,
    fp8_dot_general,
    optim,
    training,
)

DN = (((1,), (0,)), ((), ()))


def _np_cast(x, dtype, fmax):
    return np.clip(np.asarray(x, np.float32), -fmax, fmax).astype(dtype).astype(np.float64)


def test_cast_matches_ml_dtypes():
    x = np.concatenate([
        np.random.default_rng(0).standard_normal(4096).astype(np.float32) * 8,
        np.float32([0.0, -0.0, 1e-9, 2.0**-9, 2.0**-10, 448.0, 449.0, 1e6, -1e6]),
    ])  # fmt: skip
    for fmt, dt in [(formats.E4M3, ml_dtypes.float8_e4m3fn), (formats.E5M2, ml_dtypes.float8_e5m2)]:
        got = np.asarray(jaxq.cast(jnp.asarray(x), fmt), np.float64)
        np.testing.assert_array_equal(got, _np_cast(x, dt, fmt.max))
    # non-finite values are never hidden: NaN stays NaN; inf -> NaN (E4M3), inf (E5M2)
    nf = jnp.array([np.nan, np.inf, -np.inf])
    assert np.isnan(np.asarray(jaxq.cast(nf, formats.E4M3))).all()
    got = np.asarray(jaxq.cast(nf, formats.E5M2))
    assert np.isnan(got[0]) and got[1] == np.inf and got[2] == -np.inf
    # ... and they propagate through the FP8 matmul and its gradient
    x = jnp.ones((2, 4)).at[0, 0].set(np.inf)
    y, vjp = jax.vjp(lambda x, w: fp8_dot_general(x, w, DN), x, jnp.ones((4, 3)))
    assert np.isnan(y[0]).all() and np.isfinite(y[1]).all()
    dw = vjp(jnp.ones((2, 3)))[1]
    assert np.isnan(dw[0]).all() and np.isfinite(dw[1:]).all()


def test_fp8_dot_forward_and_backward_against_reference():
    x, w, g = normals(0, (16, 32), (32, 8), (16, 8))
    xq = _np_cast(x, ml_dtypes.float8_e4m3fn, 448.0)
    wq = _np_cast(w, ml_dtypes.float8_e4m3fn, 448.0)
    gq = _np_cast(g, ml_dtypes.float8_e5m2, 57344.0)
    y, vjp = jax.vjp(lambda x, w: fp8_dot_general(x, w, DN), x, w)
    np.testing.assert_allclose(y, xq @ wq, rtol=1e-5, atol=1e-5)
    dx, dw = vjp(g)
    np.testing.assert_allclose(dx, gq @ wq.T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw, xq.T @ gq, rtol=1e-5, atol=1e-5)
    # under jit, with batch dimension numbers, and with static scales
    dx2 = jax.jit(jax.grad(lambda x: fp8_dot_general(x, w, DN).sum()))(x)
    np.testing.assert_allclose(dx2, np.ones((16, 8)) @ wq.T, rtol=1e-5)
    a, b = normals(1, (3, 4, 5), (3, 5, 2))
    bdn = (((2,), (1,)), ((0,), (0,)))
    ref = np.einsum("bij,bjk->bik", _np_cast(a, ml_dtypes.float8_e4m3fn, 448),
                    _np_cast(b, ml_dtypes.float8_e4m3fn, 448))  # fmt: skip
    np.testing.assert_allclose(fp8_dot_general(a, b, bdn), ref, rtol=1e-5)
    dot4 = Fp8DotGeneral(lhs_scale=4.0)
    np.testing.assert_allclose(
        dot4(8 * x, w, DN), 4 * _np_cast(2 * x, ml_dtypes.float8_e4m3fn, 448) @ wq, rtol=1e-5
    )


def test_fp8_config_validation():
    with pytest.raises(ValueError, match="lhs_scale"):
        Fp8DotGeneral(lhs_scale=0.0)
    with pytest.raises(TypeError, match="fwd_format"):
        Fp8DotGeneral(fwd_format="e4m3")


def _train(dot_general, *, width, layers, steps, evaluate, seed=0):
    tokens = data.load_tokens(max_bytes=400_000)
    train, val = data.split(tokens)
    model = TransformerDecoder(features=width, layers=layers, heads=max(1, width // 32),
                               dot_general=dot_general, rngs=nnx.Rngs(seed))  # fmt: skip
    tx = optim.adamw(2.0**-2, tags=model)
    if evaluate:
        return training.train_lm(model, tx, train, val, steps=steps, batch_size=16, seq_len=32,
                                 seed=seed)["val_loss"]  # fmt: skip
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    step = training.make_train_step(graphdef, rest, tx, batch_size=16, seq_len=32,
                                    train_tokens=train)  # fmt: skip
    losses = training.run_steps(step, params, tx.init(params), steps=steps, seed=seed)[2]
    return float(np.mean(losses[-10:]))  # same batches for both runs (same seed)


def _check_fp8_close(width, layers, steps, evaluate):
    f32 = _train(None, width=width, layers=layers, steps=steps, evaluate=evaluate)
    fp8 = _train(fp8_dot_general, width=width, layers=layers, steps=steps, evaluate=evaluate)
    # it trained (well below the uniform log(256) = 5.55 nats) ...
    assert f32 < 0.75 * np.log(256)
    # ... and FP8 with static unit scales is within 2% of float32
    assert abs(fp8 / f32 - 1) < 0.02, (f32, fp8)
    return f32, fp8


def test_fp8_training_short():
    """Short: mean training loss of the last 10 of 50 steps (identical batches)."""
    f32, fp8 = _check_fp8_close(width=32, layers=1, steps=50, evaluate=False)
    print(f"train loss f32 {f32:.4f}  fp8 {fp8:.4f}  rel {fp8 / f32 - 1:+.4%}")


@pytest.mark.fidelity
def test_fp8_training_full():
    """Full: validation loss after 400 steps at width 128, 2 layers."""
    f32, fp8 = _check_fp8_close(width=128, layers=2, steps=400, evaluate=True)
    print(f"val loss f32 {f32:.4f}  fp8 {fp8:.4f}  rel {fp8 / f32 - 1:+.4%}")
