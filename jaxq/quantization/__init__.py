"""Quantization: casting, QArray, quantize/dequantize, calibration, fake-quant."""

from jaxq.quantization.calibration import MSE, Absmax, AmaxHistory, Percentile
from jaxq.quantization.cast import cast
from jaxq.quantization.fake_quant import fake_quant, lsq_quant
from jaxq.quantization.qarray import Layout, QArray
from jaxq.quantization.qdq import dequantize, quantize

__all__ = [
    "cast", "quantize", "dequantize", "QArray", "Layout",
    "Absmax", "Percentile", "MSE", "AmaxHistory", "fake_quant", "lsq_quant",
]  # fmt: skip
