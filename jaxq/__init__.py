"""jaxq: quantization and low-precision training for JAX.

Layers (each depends only on those above it): ``formats`` -> quantization (``cast``,
``QArray``, ``quantize``/``dequantize``, calibration, fake-quant) -> ops (the scaled world:
``ScaledArray``/``scalify``; ``unit_scaling``) -> integrations (``optim``) -> ``kernels``.
``analysis`` inspects tensor scales; ``models`` and ``data`` serve examples and the demo.

Subpackages that pull in Flax or optax (``optim``, ``unit_scaling``, ``analysis``,
``models``, ``kernels``) are imported on first attribute access.

Example:
    >>> import jax, jaxq
    >>> x = jax.random.normal(jax.random.key(0), (256, 256))
    >>> q = jaxq.quantize(x, "int4", block_size=128)
    >>> q.bits_per_element
    4.25
"""

import importlib

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
from jaxq.scaled import ScaledArray, as_scaled_array, asarray, scalify

__version__ = "0.1.0"

_LAZY = (
    "analysis", "data", "kernels", "kvcache", "lora", "models", "ops", "optim", "ptq", "recipes",
    "unit_scaling", "wrapping",
)  # fmt: skip


_FROM = {
    "hadamard": "jaxq.ops.hadamard",
    "Rule": "jaxq.wrapping",
    "quantize_model": "jaxq.wrapping",
    "QuantState": "jaxq.wrapping",
    "unused_rules": "jaxq.wrapping",
}


def __getattr__(name):
    if name in _FROM:
        return getattr(importlib.import_module(_FROM[name]), name)
    if name in _LAZY:
        return importlib.import_module(f"jaxq.{name}")
    raise AttributeError(f"module 'jaxq' has no attribute {name!r}")


__all__ = [
    "formats", "__version__",
    "cast", "quantize", "dequantize", "QArray", "Layout",
    "Absmax", "Percentile", "MSE", "AmaxHistory", "fake_quant", "lsq_quant",
    "ScaledArray", "scalify", "as_scaled_array", "asarray",
    *_FROM, *_LAZY,
]  # fmt: skip
