"""Scale analysis: where do a model's tensors sit relative to FP8's representable range?

:func:`track_scales` lists every tensor of a loss function's forward and backward pass
with its log2 RMS; :meth:`ScaleReport.flagged` lists those outside a format's range;
:func:`plot_scales` draws them against the E4M3 and E5M2 ranges.

Example:
    >>> import jax.numpy as jnp
    >>> from jaxq import analysis
    >>> rep = analysis.track_scales(lambda x: jnp.mean(jnp.sin(x) * 1e4), jnp.ones(8))
    >>> [(e.name, why) for e, why in rep.flagged("e4m3", phases=("backward",))]
    [('mul', 'overflow'), ('mul', 'overflow')]
    >>> rep.flagged("e5m2", phases=("backward",))
    ()
"""

from jaxq.analysis.plot import plot_scales
from jaxq.analysis.report import ScaleReport, TensorScale, format_range
from jaxq.analysis.tracking import track_scales

__all__ = ["track_scales", "plot_scales", "ScaleReport", "TensorScale", "format_range"]
