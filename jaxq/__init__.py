"""jaxq: quantization and low-precision training for JAX.

Layers (each depends only on those above it): ``formats`` -> quantization (``cast``,
``QArray``, ``quantize``/``dequantize``, calibration, fake-quant) -> ops (scaled world,
unit scaling) -> recipes -> integrations (``optim``) -> ``kernels``.

Example:
    >>> import jax, jaxq
    >>> x = jax.random.normal(jax.random.key(0), (256, 256))
    >>> q = jaxq.quantize(x, "int4", block_size=128)
    >>> err = jaxq.dequantize(q) - x
"""

from jaxq import formats
from jaxq.quantization import (
    MSE,
    Absmax,
    AmaxHistory,
    Layout,
    Percentile,
    QArray,
    cast,
    dequantize,
    fake_quant,
    lsq_quant,
    quantize,
)

__version__ = "0.1.0"

__all__ = [
    "formats", "__version__",
    "cast", "quantize", "dequantize", "QArray", "Layout",
    "Absmax", "Percentile", "MSE", "AmaxHistory", "fake_quant", "lsq_quant",
]  # fmt: skip
