"""Accelerator kernels, importable as ``jaxq.kernels``.

Each kernel has a pure-``jnp`` reference, a Pallas implementation, an availability check
and a dispatcher that picks the kernel on GPU/TPU and XLA elsewhere. Kernels never change
numerics: a kernel and its reference agree within a stated tolerance on random inputs.

Kernels (see :func:`jaxq.kernels.registry.table` for where each implementation runs);
all have a Pallas Triton implementation for NVIDIA GPUs:

* :func:`weight_only_matmul` — float activations × packed INT4/NF4/E2M1 or INT8 weights
  with group or per-row scales (the serving product of :mod:`jaxq.ptq`), also as a Pallas
  Mosaic TPU kernel (:mod:`jaxq.kernels.weight_only_tpu`);
* :func:`w4a8_matmul` — E4M3 activations × packed INT4 weights (FireQ's W4A8);
* :func:`scaled_fp8_matmul` — FP8 × FP8 with per-row/per-column scales or DeepSeek-V3's
  1×128 × 128×128 block scales, optionally with the output's amax;
* :func:`fp4_matmul` — MXFP4 × MXFP4 or NVFP4 × NVFP4: block scales decoded in registers,
  bfloat16 MMAs (Hopper has no FP4 or block-scaled MMA);
* :func:`cast_transpose` — FP8 codes of ``x`` and ``xᵀ`` and ``x``'s amax in one pass;
* :func:`block_quantize` — MXFP8 / MXFP4 / NVFP4 block quantization, equal to
  :func:`jaxq.quantize` bit for bit (both quantizers also as Pallas Mosaic TPU kernels,
  :mod:`jaxq.kernels.fused_quantize_tpu`);
* :func:`fused_adam.adam_update` — the 8-bit or FP8 Adam step (decode, update,
  re-encode per block) in one pass over the optimizer state, the ``implementation=None``
  of :func:`jaxq.optim.adamw_8bit` and :func:`jaxq.optim.adamw_fp8`;
* :func:`fused_adam_4bit.adam_update` — the same for the packed 4-bit moments of
  :func:`jaxq.optim.adamw_4bit` (two passes where the second moment is normalized by the
  row and column maxima of a matrix).

Every dispatcher takes ``implementation=None | "pallas" | "xla"`` (or an implementation's
name) and ``interpret=True`` to run its Pallas kernel in interpret mode on any platform.
``JAXQ_KERNELS=xla`` in the environment forces XLA wherever ``implementation`` is ``None``.
"""

import jax

from . import fused_adam, fused_adam_4bit, fused_quantize_tpu, registry, weight_only_tpu
from .fp4_gemm import fp4_matmul
from .fp8_gemm import scaled_fp8_matmul
from .fused_quantize import block_quantize, cast_transpose
from .w4a8 import w4a8_matmul
from .weight_only import weight_only_matmul

__all__ = ["backend", "registry", "weight_only_matmul", "w4a8_matmul", "scaled_fp8_matmul",
           "fp4_matmul", "cast_transpose", "block_quantize", "weight_only_tpu",
           "fused_quantize_tpu", "fused_adam", "fused_adam_4bit"]


def backend() -> str:
    """Name of the platform the dispatchers target (``"cpu"``, ``"gpu"`` or ``"tpu"``).

    Example:
        >>> from jaxq import kernels
        >>> kernels.backend() in ("cpu", "gpu", "tpu")
        True
    """
    return jax.default_backend()
