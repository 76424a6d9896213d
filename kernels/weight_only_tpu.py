"""The weight-only GEMM on TPU: a Pallas Mosaic TPU kernel over the same packed layout.

Same product and operands as :mod:`jaxq.kernels.weight_only` (whose dispatcher runs this
kernel on TPU). The grid is ``(M / block_m, N / block_n, K / block_k)`` with ``K`` last and
sequential: each step loads ``(block_n, block_k / 2)`` packed bytes, decodes the two
nibbles on the VPU, multiplies them by their scales, and accumulates two MXU products
with the even and odd activation columns into the float32 output block, which stays in
VMEM across the ``K`` steps.

A step spans eight scale groups (``block_k = 8 g``), so the scale block ``(8, block_n)``
(of the transposed ``(K/g, N)`` scales) meets Mosaic's ``(8, 128)`` tiling; its expansion
to one scale per byte column is an exact product with a 0/1 matrix, ``Sᵀ E``, which keeps
every slice of the step lane-aligned. Per-row scales multiply the output once at the end.

Tolerance: that of :mod:`jaxq.kernels.weight_only`.

Example:
    >>> import jax, jaxq
    >>> from jaxq.kernels import weight_only_matmul
    >>> w = jaxq.quantize(jax.random.normal(jax.random.key(0), (128, 512)), "nf4",
    ...                   block_size=64)
    >>> x = jax.random.normal(jax.random.key(1), (4, 512))
    >>> y = weight_only_matmul(x, w, implementation="mosaic_tpu", interpret=True)
    >>> float(abs(y - weight_only_matmul(x, w, implementation="xla")).max()) < 1e-3
    True
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from jaxq.quantization.qarray import QArray

from . import registry as R

__all__ = ["why_not", "matmul"]


def _k_bytes(w: QArray) -> int | None:
    """Packed bytes per grid step along K, or ``None`` when no step fits Mosaic's tiling."""
    per = 2 if w.packed else 1
    kc = w.codes.shape[-1]
    if w.layout.kind == "block":
        step = 8 * w.layout.block_size // per  # eight groups
        if kc % step == 0:
            return step
        return kc if kc <= 8192 else None  # one step over all of K (full-extent blocks)
    for step in (512, 256, 128):
        if kc % step == 0:
            return step
    return kc if kc <= 8192 else None


def why_not(x, w: QArray, *, interpret: bool = False) -> str | None:
    """Why the Mosaic TPU kernel cannot run these arguments here (``None``: it can).

    The format, dtype and layout checks are :func:`jaxq.kernels.weight_only.why_not`'s."""
    if not interpret and R.platform() != "tpu":
        return f"needs a TPU, the default backend is {R.platform()!r}"
    if _k_bytes(w) is None:
        return f"K = {w.shape[-1]}: no K step that is a multiple of 128 bytes and 8 groups"
    return None


def _kernel(*refs, nx, fmt_name, per_group, half_group, n_k):
    from .weight_only import decode_nibbles

    x_refs, (c_ref, s_ref, o_ref) = refs[:nx], refs[nx:]
    k = pl.program_id(2)

    @pl.when(k == 0)
    def _init():
        o_ref[...] = jnp.zeros(o_ref.shape, jnp.float32)

    c = c_ref[...].astype(jnp.int32)
    if nx == 2:
        c = c & 0xFF
        planes = (decode_nibbles(c & 15, fmt_name), decode_nibbles(c >> 4, fmt_name))
    else:
        planes = (c.astype(jnp.float32),)
    if per_group:  # one scale per byte column: S^T E with E[j, b] = (b // (g/2) == j)
        s = s_ref[...]
        gps, width = s.shape[0], c.shape[1]
        col = jax.lax.broadcasted_iota(jnp.int32, (gps, width), 1) // half_group
        row = jax.lax.broadcasted_iota(jnp.int32, (gps, width), 0)
        expand = (col == row).astype(jnp.float32)
        s_exp = jnp.dot(s.T, expand, precision=jax.lax.Precision.HIGHEST,
                        preferred_element_type=jnp.float32)  # fmt: skip
        planes = tuple(p * s_exp for p in planes)
    dims = (((1,), (1,)), ((), ()))
    acc = o_ref[...]
    for x_ref, wv in zip(x_refs, planes, strict=True):
        xv = x_ref[...]
        precision = jax.lax.Precision.HIGHEST if xv.dtype == jnp.float32 else None
        acc += jax.lax.dot_general(xv, wv.astype(xv.dtype), dims, precision=precision,
                                   preferred_element_type=jnp.float32)  # fmt: skip
    o_ref[...] = acc
    if not per_group:

        @pl.when(k == n_k - 1)
        def _scale():
            o_ref[...] = o_ref[...] * s_ref[...]


def _tile(d: int, small: int, big: int, threshold: int) -> int:
    if d <= small:
        return d  # the whole axis: a full-extent block
    return small if d <= threshold else big


def _matmul_2d(x, codes, scale, *, fmt_name, packed, group, kb, interpret):
    from jax.experimental.pallas import tpu as pltpu

    m, _ = x.shape
    n, kc = codes.shape
    xs = (x[:, 0::2], x[:, 1::2]) if packed else (x,)
    if packed:
        codes = jax.lax.bitcast_convert_type(codes, jnp.int8)
    per_group = group is not None
    bm = _tile(m, 16, 256, 16)
    bn = n if n <= 256 else 256
    n_k = kc // kb
    if per_group:
        half = group // (2 if packed else 1)
        s_arr = scale.T  # (K/g, N)
        s_spec = pl.BlockSpec((kb // half, bn), lambda i, j, k: (k, j))
    else:
        half = 1
        s_arr, s_spec = scale.reshape(1, n), pl.BlockSpec((1, bn), lambda i, j, k: (0, j))
    kernel = functools.partial(_kernel, nx=len(xs), fmt_name=fmt_name, per_group=per_group,
                               half_group=half, n_k=n_k)  # fmt: skip
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((m, n), jnp.float32),
        grid=(pl.cdiv(m, bm), pl.cdiv(n, bn), n_k),
        in_specs=[pl.BlockSpec((bm, kb), lambda i, j, k: (i, k))] * len(xs)
        + [pl.BlockSpec((bn, kb), lambda i, j, k: (j, k)), s_spec],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j, k: (i, j)),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name=f"jaxq_weight_only_{fmt_name}_tpu",
    )(*xs, codes, s_arr.astype(jnp.float32))


def matmul(x, w: QArray, fmt_name: str, interpret: bool) -> jax.Array:
    """Runs the kernel on checked arguments (2-D or batched 3-D)."""
    group = w.layout.block_size if w.layout.kind == "block" else None
    scale = w.scale.reshape(w.codes.shape[:-1] + (-1,))
    fn = functools.partial(_matmul_2d, fmt_name=fmt_name, packed=w.packed, group=group,
                           kb=_k_bytes(w), interpret=interpret)  # fmt: skip
    if x.ndim == 2:
        return fn(x, w.codes, scale)
    return jax.vmap(fn)(x, w.codes, scale)
