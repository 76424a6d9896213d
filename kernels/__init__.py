"""Accelerator kernels, importable as ``jaxq.kernels``.

Each kernel has a pure-``jnp`` reference, a Pallas implementation, an availability check
and a dispatcher that picks the kernel on GPU/TPU and XLA elsewhere. Kernels never change
numerics: a kernel and its reference agree within a stated tolerance on random inputs.
"""

import jax

__all__ = ["backend"]


def backend() -> str:
    """Name of the platform the dispatchers target (``"cpu"``, ``"gpu"`` or ``"tpu"``).

    Example:
        >>> from jaxq import kernels
        >>> kernels.backend() in ("cpu", "gpu", "tpu")
        True
    """
    return jax.default_backend()
