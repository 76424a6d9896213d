"""jaxq: quantization and low-precision training for JAX.

Layers (each depends only on those above it): ``formats`` -> quantization (``cast``,
``QArray``, ``quantize``/``dequantize``, calibration, fake-quant) -> ops (scaled world,
unit scaling) -> recipes -> integrations (``optim``) -> ``kernels``.
"""

from jaxq import formats

__version__ = "0.1.0"

__all__ = ["formats", "__version__"]
