"""Weight-only GEMM: float activations times packed 4-bit or int8 weights with scales.

For activations ``x`` of shape ``(M, K)`` and a :class:`jaxq.QArray` weight ``W`` of shape
``(N, K)`` (the canonical ``(rows, contraction)`` orientation of :mod:`jaxq.ptq`, 4-bit
codes packed two per byte along ``K``, code ``2j`` in the low nibble of byte ``j``):

.. math::

    y_{mn} = \\sum_k x_{mk}\\, \\mathrm{dec}(c_{nk})\\, s_{n, \\lfloor k / g \\rfloor}

accumulated in float32. Formats: INT4 (two's complement), NF4 (level index), FP4 E2M1
(bit pattern) and INT8, with float32 scales per group of ``g`` (32, 64, 128 or 256) along
``K`` or per output channel; and the block-scaled FP4 formats, whose scales the kernel
decodes from their bytes in registers:

* MXFP4: ``g = 32``, E8M0 scales ``s = 2^{e - 127}`` (byte ``e``; 255 is NaN);
* NVFP4: ``g = 16``, E4M3 scales, and the float32 tensor scale ``t`` applied to the
  float32 result, ``y = t \\sum_k x\\, c\\, s`` (``K`` a multiple of 32: one kernel
  step covers two blocks).

Batched ``(B, M, K) × (B, N, K)`` works the same way.

The Triton kernel never unpacks the weight in memory: it splits the activations into
their even and odd columns (an activation-sized pass), so that the low and high nibbles
of one byte multiply ``x[:, 0::2]`` and ``x[:, 1::2]``. Per ``K`` step of one group it
loads ``(block_n, g/2)`` bytes, decodes both nibbles in registers, multiplies them by the
group's scale, casts them to the activation dtype and accumulates two ``dot``\\ s in
float32. Decode shapes (``M <= 16``) split ``K`` over extra programs (split-K) whose
float32 partial sums are added afterwards.

On Hopper GPUs with JAX >= 0.12, bfloat16/float16 activations times INT4, NF4, E2M1 or
INT8 weights go to a Pallas Mosaic GPU kernel first (:mod:`jaxq.kernels.weight_only_mosaic`:
the same even/odd split, the weight dequantized per step into shared memory for
``wgmma``).

Tolerance: ``|y - y_ref| <= 2^-7 · Σ_k |x_{mk} w_{nk}| + 1e-6`` for bfloat16/float16
activations (the dequantized weight is rounded once to the activation dtype; an E2M1 code
times an E8M0 or E4M3 scale is exact in bfloat16), ``1e-5`` relative to the same sum for
float32 activations. The weight is cast to the activation dtype in registers, so float16
activations need ``|deq(w)| <= 65504``.

Example:
    >>> import jax, jax.numpy as jnp, jaxq
    >>> from jaxq.kernels import weight_only_matmul
    >>> w = jaxq.quantize(jax.random.normal(jax.random.key(0), (96, 256)), "int4",
    ...                   block_size=128)
    >>> x = jax.random.normal(jax.random.key(1), (3, 256))
    >>> y = weight_only_matmul(x, w, implementation="pallas", interpret=True)
    >>> ref = weight_only_matmul(x, w, implementation="xla")
    >>> y.shape, bool(jnp.allclose(y, ref, atol=1e-3))
    ((3, 96), True)
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from jaxq import formats as F
from jaxq.quantization.cast import e4m3_values, e8m0_values
from jaxq.quantization.qarray import QArray, dequantize

from . import registry as R

__all__ = ["weight_only_matmul", "reference", "Config", "why_not", "decode_nibbles",
           "decode_scales", "step_scales", "kernel_for"]

_ACT_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)
_FORMATS = {"int4": F.INT4, "nf4": F.NF4, "e2m1": F.E2M1, "int8": F.INT8,
            "mxfp4": F.MXFP4, "nvfp4": F.NVFP4}
# the stored scale dtype of each format (float32 unless named), decoded in the kernel
_SCALE_DTYPES = {"mxfp4": np.dtype(F.E8M0.dtype), "nvfp4": np.dtype(F.E4M3.dtype)}


@dataclasses.dataclass(frozen=True)
class Config:
    """Tiling of the Triton kernel (``None``: chosen from the shapes).

    The Mosaic GPU kernel takes ``block_n`` where it is 64 or 128 and ``split_k`` as an
    upper bound (a divisor of its number of ``K`` steps), and ignores the rest.

    Attributes:
        block_m: rows of ``x`` per program (at least 16).
        block_n: output columns per program.
        split_k: programs sharing one output tile along ``K``.
        num_warps: Triton warps per program.
        num_stages: Triton software-pipelining stages.
    """

    block_m: int | None = None
    block_n: int | None = None
    split_k: int | None = None
    num_warps: int = 4
    num_stages: int = 3


def reference(x: jax.Array, w: QArray) -> jax.Array:
    """``x · deq(w)ᵀ`` in float32 at the highest precision (the XLA implementation).

    This is exactly what :func:`jaxq.ops.operand.matmul` computes for a float activation
    and a quantized weight.
    """
    nb = x.ndim - 2
    dims = (((x.ndim - 1,), (x.ndim - 1,)), (tuple(range(nb)), tuple(range(nb))))
    return jax.lax.dot_general(
        x.astype(jnp.float32), dequantize(w, jnp.float32), dims,
        precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32,
    )  # fmt: skip


# --------------------------------------------------------------------------- decoding


def decode_nibbles(c: jax.Array, fmt_name: str) -> jax.Array:
    """float32 values of 4-bit codes held in an int32 array (in-kernel arithmetic, no
    gathers), bit-identical to :func:`jaxq.quantization.codes.decode`."""
    if fmt_name in _SCALE_DTYPES:  # MXFP4 / NVFP4 elements
        fmt_name = "e2m1"
    if fmt_name == "int4":
        return ((c ^ 8) - 8).astype(jnp.float32)
    if fmt_name == "e2m1":
        e = (c >> 1) & 3
        m = (c & 1).astype(jnp.float32)
        p = jnp.where(e == 1, 1.0, jnp.where(e == 2, 2.0, 4.0))
        mag = jnp.where(e == 0, 0.5 * m, p * (1.0 + 0.5 * m))
        return jnp.where((c & 8) != 0, -mag, mag)
    if fmt_name == "nf4":  # a binary select tree over the 16 levels
        lv = [np.float32(v) for v in F.NF4_LEVELS]
        b = [(c >> i) & 1 for i in range(4)]
        level = [jnp.where(b[0] == 1, lv[i + 1], lv[i]) for i in range(0, 16, 2)]
        for bit in b[1:]:
            level = [jnp.where(bit == 1, level[i + 1], level[i]) for i in range(0, len(level), 2)]
        return level[0]
    raise ValueError(f"no 4-bit decoder for {fmt_name!r}")


def decode_scales(bits: jax.Array, fmt_name: str) -> jax.Array:
    """float32 values of a block format's scale bytes (in-kernel integer arithmetic): E8M0
    ``2^{e - 127}`` (NaN for 255; ``2^-127``, a float32 subnormal, for 0) for MXFP4, E4M3
    for NVFP4; bit-identical to ``scale.astype(float32)``."""
    return e4m3_values(bits) if fmt_name == "nvfp4" else e8m0_values(bits)


def _fmt_name(w: QArray) -> str | None:
    for name, fmt in _FORMATS.items():
        if w.fmt == fmt:
            return name
    return None


# ------------------------------------------------------------------------ availability


def _check_args(x, w) -> None:
    """TypeError/ValueError for arguments no implementation can take."""
    if not isinstance(w, QArray):
        raise TypeError(f"weight_only_matmul: w must be a jaxq.QArray, got {type(w).__name__}")
    if not hasattr(x, "shape") or not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"weight_only_matmul: x must be a floating-point array, got "
                        f"{getattr(x, 'dtype', type(x).__name__)}")  # fmt: skip
    if x.ndim not in (2, 3) or w.ndim != x.ndim:
        raise ValueError(f"weight_only_matmul: x {tuple(x.shape)} and w {w.shape} must be "
                         "(M, K) and (N, K), or (B, M, K) and (B, N, K)")  # fmt: skip
    if x.shape[-1] != w.shape[-1] or x.shape[:-2] != w.shape[:-2]:
        raise ValueError(f"weight_only_matmul: x has shape {tuple(x.shape)}, w {w.shape}; "
                         "expected equal contraction (last) and batch (first) sizes")  # fmt: skip


def _k_step(w: QArray) -> int | None:
    """Bytes of codes along ``K`` per kernel step (one scale group), or ``None``."""
    per_byte = 2 if w.packed else 1
    kc = w.codes.shape[-1]
    if w.layout.kind == "block":  # one group per step; two for NVFP4's 16-element blocks
        step = max(16, w.layout.block_size // per_byte)
        return step if kc % step == 0 else None
    for step in (64, 32, 16):
        if kc % step == 0:
            return step
    return None


def why_not(impl: R.Implementation, x, w: QArray, *, interpret: bool = False) -> str | None:
    """Why ``impl`` cannot multiply these arguments here (``None``: it can)."""
    if impl.name not in ("mosaic_gpu", "triton", "mosaic_tpu"):
        return f"no {impl.name} implementation"
    if not interpret and impl.name == "triton":
        reason = R.check_gpu(8.0)
        if reason:
            return reason
    name = _fmt_name(w)
    if name is None:
        return f"format {w.fmt.name} (supported: {', '.join(_FORMATS)})"
    want = _SCALE_DTYPES.get(name, np.dtype(np.float32))
    if w.zero_point is not None or np.dtype(w.scale.dtype) != want:
        return f"needs symmetric {want.name} scales"
    if np.dtype(x.dtype) not in [np.dtype(d) for d in _ACT_DTYPES]:
        return f"activation dtype {x.dtype} (supported: bfloat16, float16, float32)"
    nd, lay = w.ndim, w.layout
    if lay.kind == "block":
        sizes = (16,) if name == "nvfp4" else (32, 64, 128, 256)
        if lay.axes != (nd - 1,) or lay.block_size not in sizes:
            return f"block layout {lay} (groups of {'/'.join(map(str, sizes))} along K)"
        if _k_step(w) is None:  # NVFP4: one kernel step covers two 16-element blocks
            return f"K = {w.shape[-1]} needs a multiple of 32"
    elif lay.kind == "channel":
        if lay.axes != tuple(range(nd - 1)):
            return f"channel layout {lay} (one scale per output row)"
        if _k_step(w) is None:
            return f"K = {w.shape[-1]} needs a multiple of {16 * (2 if w.packed else 1)}"
    else:
        return "per-tensor scale (use channel or block scales)"
    if impl.name == "mosaic_gpu":
        from . import weight_only_mosaic

        return (weight_only_mosaic.why_not(x, w, name)
                or R.check_mosaic_gpu(impl, 9.0, interpret))  # fmt: skip
    if impl.name == "mosaic_tpu":
        from . import weight_only_tpu

        if name in _SCALE_DTYPES:
            return f"{name} weights: the Triton kernel only"
        return weight_only_tpu.why_not(x, w, interpret=interpret)
    return None


# ----------------------------------------------------------------------------- kernel


def step_scales(s_ref, i, fmt_name, groups, step):
    """The scales of step ``i``'s ``groups`` groups, as float32 ``(block_n, 1)`` or, for two
    groups, ``(block_n, step)`` (each group's scale over its half of the step's bytes)."""
    def load(j):
        s = s_ref[:, pl.ds(j, 1)]
        return decode_scales(s, fmt_name) if fmt_name in _SCALE_DTYPES else s

    if groups == 1:
        return load(i)
    col = jax.lax.broadcasted_iota(jnp.int32, (1, step), 1)
    return jnp.where(col < step // 2, load(2 * i), load(2 * i + 1))


def _kernel(*refs, nx, fmt_name, step, per_group, groups, total, per_split, cdtype,
            precision):  # fmt: skip
    x_refs, (c_ref, s_ref, o_ref) = refs[:nx], refs[nx:]
    lo = pl.program_id(2) * per_split
    hi = jnp.minimum(lo + per_split, total)
    dims = (((1,), (1,)), ((), ()))

    def body(i, acc):
        c = c_ref[:, pl.ds(i * step, step)].astype(jnp.int32)
        if nx == 2:
            planes = (decode_nibbles(c & 15, fmt_name), decode_nibbles(c >> 4, fmt_name))
        else:
            planes = (c.astype(jnp.float32),)
        s = step_scales(s_ref, i, fmt_name, groups, step) if per_group else None
        for x_ref, wv in zip(x_refs, planes, strict=True):
            if per_group:
                wv = wv * s
            xv = x_ref[:, pl.ds(i * step, step)]
            acc += jax.lax.dot_general(xv, wv.astype(cdtype), dims, precision=precision,
                                       preferred_element_type=jnp.float32)  # fmt: skip
        return acc

    acc = jnp.zeros(o_ref.shape, jnp.float32)
    acc = jax.lax.fori_loop(lo, hi, body, acc)
    if not per_group:
        acc = acc * s_ref[...]
    o_ref[...] = acc


def _tiles(m: int, n: int, total: int, cfg: Config) -> tuple[int, int, int]:
    bm = cfg.block_m or (16 if m <= 16 else 32 if m <= 32 else 64)
    # a tile that divides N where one does, so that the weight is never padded
    bn = cfg.block_n or R.dividing_tile(n, 64 if m <= 16 else 128)
    if cfg.split_k:
        split = cfg.split_k
    elif m <= 16:  # decode: enough programs to fill ~132 SMs twice
        split = max(1, min(total, 264 // max(1, pl.cdiv(m, bm) * pl.cdiv(n, bn))))
    else:
        split = 1
    per_split = pl.cdiv(total, split)
    return bm, bn, pl.cdiv(total, per_split)


def _triton_2d(x, codes, scale, *, fmt_name, packed, block_k, groups, cfg, interpret):
    from jax.experimental.pallas import triton as plt

    m, _ = x.shape
    n, kc = codes.shape
    per_group = block_k is not None
    step = block_k if per_group else next(s for s in (64, 32, 16) if kc % s == 0)
    total = kc // step
    if packed:
        xs = (x[:, 0::2], x[:, 1::2])
    else:
        xs = (x,)
    cdtype = x.dtype
    precision = jax.lax.Precision.HIGHEST if cdtype == jnp.float32 else None
    bm, bn, split = _tiles(m, n, total, cfg)
    per_split = pl.cdiv(total, split)
    # whole tiles only (registry.pad_to): activation rows, and weight rows where no tile
    # divides N
    xs = tuple(R.pad_to(xi, (bm, None)) for xi in xs)
    codes, scale = R.pad_to(codes, (bn, None)), R.pad_to(scale, (bn, None))
    mp, np_ = xs[0].shape[0], codes.shape[0]
    if per_group:
        s_arr, s_spec = scale, pl.BlockSpec((bn, scale.shape[1]), lambda i, j, s: (j, 0))
    else:
        s_arr, s_spec = scale.reshape(1, np_), pl.BlockSpec((1, bn), lambda i, j, s: (0, j))
    x_spec = pl.BlockSpec((bm, kc), lambda i, j, s: (i, 0))
    c_spec = pl.BlockSpec((bn, kc), lambda i, j, s: (j, 0))
    out_spec = pl.BlockSpec((None, bm, bn), lambda i, j, s: (s, i, j))
    kernel = functools.partial(
        _kernel, nx=len(xs), fmt_name=fmt_name, step=step, per_group=per_group,
        groups=groups, total=total, per_split=per_split, cdtype=cdtype, precision=precision,
    )  # fmt: skip
    partial = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((split, mp, np_), jnp.float32),
        grid=(mp // bm, np_ // bn, split),
        in_specs=[x_spec] * len(xs) + [c_spec, s_spec],
        out_specs=out_spec,
        compiler_params=plt.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret,
        name=f"jaxq_weight_only_{fmt_name}",
    )(*xs, codes, s_arr)
    out = partial[0] if split == 1 else jnp.sum(partial, axis=0)
    return out[:m, :n]


def _triton(x, w: QArray, cfg: Config, interpret: bool) -> jax.Array:
    name = _fmt_name(w)
    block_k = _k_step(w) if w.layout.kind == "block" else None
    groups = 1 if block_k is None else block_k * (2 if w.packed else 1) // w.layout.block_size
    scale = w.scale.reshape(w.codes.shape[:-1] + (-1,))
    if name in _SCALE_DTYPES:  # the scale bytes travel as uint8, decoded in the kernel
        scale = jax.lax.bitcast_convert_type(scale, jnp.uint8)
    fn = functools.partial(_triton_2d, fmt_name=name, packed=w.packed, block_k=block_k,
                           groups=groups, cfg=cfg, interpret=interpret)  # fmt: skip
    y = fn(x, w.codes, scale) if x.ndim == 2 else jax.vmap(fn)(x, w.codes, scale)
    return y if w.tensor_scale is None else y * w.tensor_scale


# ------------------------------------------------------------------------- dispatcher


def weight_only_matmul(
    x: jax.Array,
    w: QArray,
    *,
    implementation: str | None = None,
    interpret: bool = False,
    config: Config | None = None,
) -> jax.Array:
    """``x · deq(w)ᵀ`` as float32, by a Pallas kernel where one runs, else by XLA.

    Args:
        x: activations ``(M, K)`` or ``(B, M, K)``, bfloat16/float16/float32.
        w: a :class:`jaxq.QArray` of shape ``(N, K)`` or ``(B, N, K)`` (INT4, NF4, E2M1 or
            INT8 with group scales along ``K`` or per-row scales; MXFP4 or NVFP4).
        implementation: ``None`` (kernel if available, else XLA), ``"pallas"``,
            ``"mosaic_gpu"`` (Hopper GPU, JAX >= 0.12,
            :mod:`~jaxq.kernels.weight_only_mosaic`), ``"triton"`` (GPU), ``"mosaic_tpu"``
            (TPU, :mod:`~jaxq.kernels.weight_only_tpu`) or ``"xla"`` (see
            :mod:`jaxq.kernels.registry`).
        interpret: run the Pallas kernel in interpret mode (any platform; for tests).
        config: tiling of the Triton kernel (:class:`Config` says what the Mosaic GPU
            kernel takes from it).

    ``implementation="pallas"`` with ``interpret=True`` picks the Mosaic GPU kernel (the
    first listed) where it takes the arguments (JAX >= 0.12, bfloat16/float16 activations,
    INT4/NF4/E2M1/INT8 weights), else the Triton kernel; name ``"mosaic_tpu"`` to interpret
    the TPU kernel.

    Returns:
        float32 ``(M, N)`` or ``(B, M, N)``.

    Raises:
        TypeError: ``w`` is not a QArray or ``x`` is not floating point.
        ValueError: mismatched shapes, or ``implementation`` names a kernel that cannot
            run these arguments here.
    """
    _check_args(x, w)
    impl = R.choose("weight_only_matmul", implementation,
                    lambda i: why_not(i, x, w, interpret=interpret))  # fmt: skip
    if impl == "xla":
        return reference(x, w)
    if impl == "mosaic_gpu":
        from . import weight_only_mosaic

        cfg = config or Config()
        return weight_only_mosaic.matmul(x, w, _fmt_name(w), interpret, cfg.block_n,
                                         cfg.split_k)  # fmt: skip
    if impl == "mosaic_tpu":
        from . import weight_only_tpu

        return weight_only_tpu.matmul(x, w, _fmt_name(w), interpret)
    return _triton(x, w, config or Config(), interpret)


def kernel_for(x, w, *, interpret: bool = False) -> str | None:
    """The Pallas implementation ``weight_only_matmul(x, w, interpret=interpret)`` would
    run here, or ``None`` (then it computes :func:`reference`). Never raises for
    unsupported arguments."""
    return R.pallas_for("weight_only_matmul", lambda: _check_args(x, w),
                        lambda i: why_not(i, x, w, interpret=interpret))  # fmt: skip


R.register(R.Kernel(
    name="weight_only_matmul",
    module=__name__,
    reference=reference,
    implementations=(
        R.Implementation("mosaic_gpu", ("gpu",), "NVIDIA GPU, compute capability >= 9.0 "
                         "(Hopper wgmma), JAX >= 0.12; bfloat16/float16 activations; "
                         "INT4/NF4/E2M1/INT8, groups 32-256 or per-row scales"),
        R.Implementation("triton", ("gpu",), "NVIDIA GPU, compute capability >= 8.0; "
                         "INT4/NF4/E2M1/INT8, groups 32-256 or per-row scales; MXFP4; NVFP4 "
                         "(K a multiple of 32)"),
        R.Implementation("mosaic_tpu", ("tpu",), "TPU; as triton but not MXFP4/NVFP4, and "
                         "K/2 a multiple of 4·g bytes (or at most 8192)"),
        R.XLA,
    ),
    tolerance="2^-7 · Σ|x·w| (bf16/f16 activations), 1e-5 · Σ|x·w| (f32)",
))  # fmt: skip
