"""Post-training quantization and quantized serving.

:func:`convert` turns a trained Flax model (NNX or Linen) into a serving model whose
selected layers hold packed quantized weights (:class:`QuantizedWeight`) and compute
exactly the quantized forward of their recipe; :mod:`jaxq.ptq.schemes` names the serving
recipes (``W8``, ``W4``, ``NF4``, ``FP4``, ``MXFP4``, ``NVFP4``, ``FP8Weights``, ``W8A8``,
``W4A8``). :func:`rotate`, :func:`smoothquant`, :func:`awq` and :func:`gptq` prepare a
:class:`Plan` that ``convert`` applies (:mod:`jaxq.ptq.algorithms`); :func:`fold` moves
smoothing divisors into the norm before the layers (:mod:`jaxq.ptq.fold`).

Example:
    >>> import jax, jaxq
    >>> from flax import nnx
    >>> model = nnx.Linear(256, 64, rngs=nnx.Rngs(0))
    >>> x = jax.random.normal(jax.random.key(1), (8, 256))
    >>> served = jaxq.ptq.convert(model, None, [jaxq.Rule(".*", recipe=jaxq.ptq.W4(128))],
    ...                           calibration=[x])
    >>> served.model.kernel.get_value().weight.codes.shape  # (1, N, K/2): two codes per byte
    (1, 64, 128)
"""

from jaxq.ptq.algorithms import awq, gptq, rotate, smoothquant
from jaxq.ptq.convert import Converted, calibrate, convert
from jaxq.ptq.fold import Folded, fold
from jaxq.ptq.plan import LayerPlan, Plan
from jaxq.ptq.schemes import FP4, MXFP4, NF4, NVFP4, W2, W3, W4, W4A8, W8, W8A8, FP8Weights
from jaxq.ptq.serving import PackedKernel
from jaxq.ptq.weights import QuantizedWeight, serving_dot_general, weight_bytes

__all__ = [
    "convert", "Converted", "calibrate", "rotate", "smoothquant", "awq", "gptq", "fold", "Folded",
    "Plan",
    "LayerPlan", "QuantizedWeight", "PackedKernel", "serving_dot_general", "weight_bytes",
    "W8", "W4", "W3", "W2", "NF4", "FP4", "MXFP4", "NVFP4", "FP8Weights", "W8A8", "W4A8",
]  # fmt: skip
