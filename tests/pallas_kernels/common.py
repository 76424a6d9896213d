"""Helpers shared by the kernel tests."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxq.kernels import registry as R


def assert_within(y, ref, bound, rel, atol=1e-6):
    """``|y - ref| <= rel · bound + atol`` elementwise, NaN where ``ref`` is NaN."""
    y, ref, bound = (np.asarray(a, np.float64) for a in (y, ref, bound))
    np.testing.assert_array_equal(np.isnan(y), np.isnan(ref))
    ok = np.isnan(ref) | (np.abs(y - ref) <= rel * bound + atol)
    if not ok.all():
        worst = np.nanmax(np.abs(y - ref) / (rel * bound + atol))
        raise AssertionError(f"{(~ok).sum()} of {ok.size} elements out of tolerance "
                             f"(worst {worst:.3g}x the bound)")


def abs_product(x, w):
    """``Σ_k |x_mk| |w_nk|`` (batched like the operands), the scale of a product's error."""
    nb = x.ndim - 2
    dims = (((x.ndim - 1,), (x.ndim - 1,)), (tuple(range(nb)), tuple(range(nb))))
    return jax.lax.dot_general(jnp.abs(x.astype(jnp.float32)), jnp.abs(w.astype(jnp.float32)),
                               dims, precision=jax.lax.Precision.HIGHEST)


def lower_or_skip(fn, *args, target="cuda"):
    """Lowers ``fn`` for an abstract H100 (``"cuda"``) or TPU; skips, printing why, when this
    jaxlib cannot."""
    try:
        return R.lower_for(fn, *args, target=target)
    except Exception as e:  # noqa: BLE001 — any lowering failure becomes a printed skip
        reason = f"cannot lower for {target} with jax {jax.__version__}: {type(e).__name__}: {e}"
        print(reason)
        pytest.skip(reason[:300])


def random_qarray(fmt, group, shape, seed=0):
    """A valid :class:`jaxq.QArray` with uniformly random codes (every code value, the
    largest included) and random positive float32 scales, built without ``jaxq.quantize``
    (whose compilation would dominate these tests). ``group``: elements per block along
    the last axis, ``None`` for one scale per row, ``"tensor"`` for one scale."""
    from jaxq import formats as F
    from jaxq.quantization.qarray import Layout, QArray

    fmt = F.get(fmt)
    rng = np.random.default_rng(seed)
    shape = tuple(shape)
    if fmt.bits == 4:
        codes = rng.integers(0, 256, shape[:-1] + (shape[-1] // 2,), dtype=np.uint8)
    elif fmt == F.INT8:
        codes = rng.integers(-127, 128, shape, dtype=np.int8)
    else:
        codes = rng.standard_normal(shape).astype(fmt.dtype)
    nd = len(shape)
    if group == "tensor":
        layout = Layout("tensor")
    elif group is None:
        layout = Layout("channel", tuple(range(nd - 1)))
    else:
        layout = Layout("block", (nd - 1,), group)
    scale = rng.uniform(0.01, 0.1, layout.scale_shape(shape)).astype(np.float32)
    return QArray(jnp.asarray(codes), jnp.asarray(scale), None, None, fmt, shape,
                  np.dtype(np.float32), layout).validate()  # fmt: skip


def assert_same_state(got, want):
    """An Adam update's ``(u, *state)``: the state bit for bit (every leaf), and ``u`` finite
    and within ``1e-6 · max(1, |u|)`` of ``want``'s (the fused kernels' stated tolerance)."""
    for a, b in zip(jax.tree.leaves(got[1:]), jax.tree.leaves(want[1:]), strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(np.ravel(a).view(np.uint8), np.ravel(b).view(np.uint8))
    u, ref = np.asarray(got[0], np.float64), np.asarray(want[0], np.float64)
    assert np.isfinite(u).all()
    np.testing.assert_array_less(np.abs(u - ref), 1e-6 * np.maximum(1.0, np.abs(ref)) + 1e-30)


def pallas_calls(fn, *args):
    """The ``pallas_call`` equations of ``fn(*args)``'s jaxpr, nested ones included."""
    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "pallas_call":
                yield eqn
            for p in eqn.params.values():
                for sub in p if isinstance(p, (tuple, list)) else (p,):
                    inner = getattr(sub, "jaxpr", sub)
                    if hasattr(inner, "eqns"):
                        yield from walk(inner)

    return list(walk(jax.make_jaxpr(fn)(*args).jaxpr))


def partial_blocks(eqn) -> list[str]:
    """The operands of a ``pallas_call`` whose block shape does not divide the array
    (Pallas's Triton backend would read and write past such a block's edge)."""
    bad = []
    for bm in eqn.params["grid_mapping"].block_mappings:
        sizes = [getattr(b, "block_size", 1) for b in bm.block_shape]
        shape = tuple(bm.array_aval.shape)
        if any(d % s for d, s in zip(shape, sizes, strict=True)):
            bad.append(f"{shape} in blocks {tuple(sizes)}")
    return bad


MOSAIC_GPU_JAX_OK = R.jax_version() >= R.MOSAIC_GPU_JAX
MOSAIC_GPU_REASON = (f"Pallas Mosaic GPU interpret mode needs JAX >= 0.12, "
                     f"installed {jax.__version__}")
needs_mosaic_gpu = pytest.mark.skipif(not MOSAIC_GPU_JAX_OK, reason=MOSAIC_GPU_REASON)


def code_bits(a):
    """The bytes of an array's elements, as uint8."""
    return np.asarray(a).view(np.uint8)


def assert_same_codes(a, b):
    """Equal bit patterns, NaN codes compared as NaN (their payload may differ)."""
    fa, fb = np.asarray(a, np.float32), np.asarray(b, np.float32)
    np.testing.assert_array_equal(np.isnan(fa), np.isnan(fb))
    keep = ~np.isnan(fa)
    np.testing.assert_array_equal(code_bits(a)[keep], code_bits(b)[keep])


def assert_mosaic_gpu_version_rule(name, module, args, call):
    """The Mosaic GPU implementation of kernel ``name`` (its ``module``, operands ``args``)
    wins in interpret mode on JAX >= 0.12 and, compiled on CPU, says it needs a GPU; on an
    older JAX Triton wins and ``mosaic_gpu`` says it needs JAX 0.12. ``call(**kw)`` runs the
    kernel with ``implementation="mosaic_gpu"`` and ``kw``."""
    impl = R.get(name).implementation("mosaic_gpu")
    why = lambda i: module.why_not(i, *args, interpret=True)  # noqa: E731
    if R.jax_version() >= R.MOSAIC_GPU_JAX:
        assert R.choose(name, "pallas", why) == "mosaic_gpu"
        assert module.kernel_for(*args, interpret=True) == "mosaic_gpu"
        assert "needs a GPU" in module.why_not(impl, *args)  # compiled, on CPU
        with pytest.raises(ValueError, match="mosaic_gpu: needs a GPU"):
            call()
    else:
        assert R.choose(name, "pallas", why) == "triton"
        assert module.kernel_for(*args, interpret=True) == "triton"
        assert "JAX >= 0.12" in module.why_not(impl, *args, interpret=True)
        with pytest.raises(ValueError, match=r"mosaic_gpu: needs JAX >= 0\.12"):
            call(interpret=True)


def assert_same_steps(kernel_tx, xla_tx, params, grads):
    """Runs two optax transformations side by side over the gradient trees ``grads`` (one
    per step): the states equal bit for bit after every step, the updates within the fused
    kernels' tolerance. Returns the last step's updates of ``kernel_tx``."""
    import optax

    sk, sx = kernel_tx.init(params), xla_tx.init(params)
    pk = px = params
    step_k, step_x = jax.jit(kernel_tx.update), jax.jit(xla_tx.update)
    for g in grads:
        uk, sk = step_k(g, sk, pk)
        ux, sx = step_x(g, sx, px)
        for a, b in zip(jax.tree.leaves(sk), jax.tree.leaves(sx), strict=True):
            np.testing.assert_array_equal(np.ravel(a).view(np.uint8), np.ravel(b).view(np.uint8))
        for a, b in zip(jax.tree.leaves(uk), jax.tree.leaves(ux), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)
        pk, px = optax.apply_updates(pk, uk), optax.apply_updates(px, ux)
    return uk
