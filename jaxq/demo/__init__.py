"""``jaxq demo``: one model trained in every precision, then quantized for serving.

See :mod:`jaxq.demo.training` (the runs), :mod:`jaxq.demo.serving` (post-training
quantization of the float32 run), :mod:`jaxq.demo.report` (table, curves, scale plot) and
:mod:`jaxq.demo.formats_table` (``jaxq formats``: bits and SQNR of every number format).
"""
