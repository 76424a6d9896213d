"""The kernel registry, platform checks and the dispatch rule every kernel follows.

Each kernel module registers a :class:`Kernel`: its name, its pure-``jnp`` reference, its
implementations in priority order (Pallas kernels first, XLA last) and the tolerance its
kernels are held to against the reference. A dispatcher asks :func:`choose` which
implementation to run:

* ``implementation=None``: the first Pallas implementation whose availability check
  passes (platform, device kind, JAX version, shapes), else XLA — the ``tokamax`` rule;
* ``"pallas"``: the first available Pallas implementation, or ``ValueError`` listing why
  each one is unavailable; an implementation's own name (e.g. ``"triton"``) picks it;
* ``"xla"``: the reference computation compiled by XLA.

The environment variable ``JAXQ_KERNELS=xla`` makes ``implementation=None`` mean ``"xla"``
everywhere (read when a dispatcher is traced: a function already compiled under ``jit``
keeps the choice it was traced with). ``JAXQ_KERNELS=interpret`` makes the dispatch points
of :mod:`jaxq.ops` run the kernels in Pallas interpret mode on any platform
(:mod:`jaxq.ops.kernel_dispatch`), to test that dispatch without an accelerator.

Example:
    >>> from jaxq import kernels
    >>> "weight_only_matmul" in kernels.registry.kernels()
    True
    >>> kernels.registry.choose("weight_only_matmul", None, lambda impl: "no GPU")
    'xla'
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp

__all__ = [
    "Implementation", "Kernel", "register", "kernels", "get", "choose", "table", "ENV",
    "platform", "jax_version", "gpu_compute_capability", "lower_for", "forced", "pallas_for",
    "pad_to", "dividing_tile", "GemmConfig", "dequantized_product",
]  # fmt: skip

ENV = "JAXQ_KERNELS"


@dataclasses.dataclass(frozen=True)
class Implementation:
    """One way to compute a kernel.

    Attributes:
        name: ``"mosaic_gpu"`` (Pallas on Mosaic GPU), ``"triton"`` (Pallas on the Triton
            GPU backend), ``"mosaic_tpu"`` (Pallas on Mosaic TPU) or ``"xla"`` (the
            reference under XLA).
        platforms: platforms (``jax.default_backend()`` names) it runs on.
        requires: human-readable device and JAX requirements.
    """

    name: str
    platforms: tuple[str, ...]
    requires: str

    @property
    def pallas(self) -> bool:
        return self.name != "xla"


XLA = Implementation("xla", ("cpu", "gpu", "tpu"), "any platform")


@dataclasses.dataclass(frozen=True)
class Kernel:
    """A registered kernel: reference, implementations (priority order) and tolerance."""

    name: str
    module: str
    reference: Callable
    implementations: tuple[Implementation, ...]
    tolerance: str

    def implementation(self, name: str) -> Implementation:
        for impl in self.implementations:
            if impl.name == name:
                return impl
        names = [i.name for i in self.implementations]
        raise ValueError(f"{self.name}: unknown implementation {name!r}; expected one of "
                         f"None, 'pallas', {', '.join(map(repr, names))}")  # fmt: skip


_REGISTRY: dict[str, Kernel] = {}


def register(kernel: Kernel) -> Kernel:
    """Adds ``kernel`` to the registry (its implementations must end with XLA)."""
    if kernel.implementations[-1].name != "xla":
        raise ValueError(f"{kernel.name}: the last implementation must be 'xla'")
    _REGISTRY[kernel.name] = kernel
    return kernel


def kernels() -> dict[str, Kernel]:
    """All registered kernels by name."""
    return dict(_REGISTRY)


def get(name: str) -> Kernel:
    if name not in _REGISTRY:
        raise ValueError(f"unknown kernel {name!r}; registered: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def forced() -> str | None:
    """``"xla"`` or ``"interpret"`` when ``JAXQ_KERNELS`` says so, else ``None``."""
    value = os.environ.get(ENV, "").strip().lower()
    return value if value in ("xla", "interpret") else None


def choose(name: str, implementation: str | None, why_not: Callable) -> str:
    """The implementation a dispatcher runs (module docstring).

    Args:
        name: the registered kernel.
        implementation: ``None``, ``"pallas"``, ``"xla"`` or an implementation's name.
        why_not: ``why_not(impl) -> str | None``: why ``impl`` cannot run these arguments
            here, or ``None`` when it can.

    Raises:
        ValueError: unknown implementation, or a Pallas one was asked for and none can run.
    """
    kernel = get(name)
    if implementation is None and forced() == "xla":
        implementation = "xla"
    if implementation not in (None, "pallas"):
        kernel.implementation(implementation)  # validates the name
    if implementation == "xla":
        return "xla"
    reasons = {}
    for impl in kernel.implementations:
        if not impl.pallas or implementation not in (None, "pallas", impl.name):
            continue
        reason = why_not(impl)
        if reason is None:
            return impl.name
        reasons[impl.name] = reason
    if implementation is None:
        return "xla"
    detail = "; ".join(f"{k}: {v}" for k, v in reasons.items())
    raise ValueError(f"{name}: implementation={implementation!r} cannot run here ({detail})")


def pallas_for(name: str, check_args: Callable, why_not: Callable) -> str | None:
    """The Pallas implementation ``choose(name, None, why_not)`` picks, or ``None`` where
    it picks XLA or ``check_args()`` rejects the arguments (``TypeError``/``ValueError``):
    what a dispatch point asks before handing a product to a kernel. Never raises for
    unsupported arguments."""
    try:
        check_args()
    except (TypeError, ValueError):
        return None
    impl = choose(name, None, why_not)
    return None if impl == "xla" else impl


def table() -> str:
    """A Markdown table of the kernels, their implementations and where each runs.

    Example:
        >>> from jaxq import kernels
        >>> print(kernels.registry.table().splitlines()[0])
        | kernel | implementation | platforms | requires | tolerance vs reference |
    """
    rows = ["| kernel | implementation | platforms | requires | tolerance vs reference |",
            "|---|---|---|---|---|"]  # fmt: skip
    for k in _REGISTRY.values():
        for impl in k.implementations:
            tol = k.tolerance if impl.pallas else "the reference itself"
            rows.append(f"| {k.name} | {impl.name} | {', '.join(impl.platforms)} | "
                        f"{impl.requires} | {tol} |")  # fmt: skip
    return "\n".join(rows)


# ----------------------------------------------------------------------- platform checks


def platform() -> str:
    """``jax.default_backend()``: ``"cpu"``, ``"gpu"`` or ``"tpu"``."""
    return jax.default_backend()


def jax_version() -> tuple[int, ...]:
    """The installed JAX version as a tuple of ints, e.g. ``(0, 10, 2)``."""
    parts = []
    for p in jax.__version__.split(".")[:3]:
        digits = "".join(ch for ch in p if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def gpu_compute_capability() -> float | None:
    """Compute capability of the first GPU (e.g. ``9.0`` for H100), or ``None``."""
    if platform() != "gpu":
        return None
    cc = getattr(jax.devices()[0], "compute_capability", None)
    try:
        return float(cc)
    except (TypeError, ValueError):
        return None


def check_gpu(min_cc: float) -> str | None:
    """``None`` when the default device is an NVIDIA GPU of compute capability ``min_cc``
    or newer, else the reason it is not."""
    if platform() != "gpu":
        return f"needs a GPU, the default backend is {platform()!r}"
    cc = gpu_compute_capability()
    if cc is None:
        return "needs an NVIDIA GPU with a compute capability (ROCm is not supported)"
    if cc < min_cc:
        return f"needs compute capability >= {min_cc}, the GPU has {cc}"
    return None


def check_triton(impl: Implementation, min_cc: float, interpret: bool) -> str | None:
    """``None`` when ``impl`` is a kernel's Triton implementation and can run here: in
    interpret mode anywhere, else on an NVIDIA GPU of compute capability ``min_cc`` or
    newer; otherwise the reason it cannot (the shared start of every ``why_not``)."""
    if impl.name != "triton":
        return f"no {impl.name} implementation"
    return None if interpret else check_gpu(min_cc)


MOSAIC_GPU_JAX = (0, 12)


def check_mosaic_gpu(impl: Implementation, min_cc: float, interpret: bool) -> str | None:
    """``None`` when ``impl`` is a kernel's Mosaic GPU implementation and can run here:
    with JAX >= 0.12 (the first with Mosaic GPU's interpret mode and the ``plgpu`` API
    these kernels use), in interpret mode anywhere, else on an NVIDIA GPU of compute
    capability ``min_cc`` or newer; otherwise the reason it cannot."""
    if impl.name != "mosaic_gpu":
        return f"no {impl.name} implementation"
    if jax_version() < MOSAIC_GPU_JAX:
        return (f"needs JAX >= {'.'.join(map(str, MOSAIC_GPU_JAX))} for Pallas Mosaic GPU, "
                f"installed {jax.__version__}")  # fmt: skip
    return None if interpret else check_gpu(min_cc)


H100 = "NVIDIA H100 80GB HBM3"
TPU_V5E = "TPU v5 lite"


@dataclasses.dataclass(frozen=True)
class GemmConfig:
    """Tiling of a GEMM kernel's Triton implementation (``None``: chosen from the shapes).

    Attributes:
        block_m: rows of the first operand per program (at least 16).
        block_n: rows of the second operand (output columns) per program.
        num_warps: Triton warps per program.
        num_stages: Triton software-pipelining stages.
    """

    block_m: int | None = None
    block_n: int | None = None
    num_warps: int = 4
    num_stages: int = 3


def dequantized_product(a, b) -> jax.Array:
    """``deq(a) · deq(b)ᵀ`` of two 2-D QArrays ``(M, K)``, ``(N, K)`` in float32 at the
    highest precision: the XLA path of the QArray × QArray GEMM kernels."""
    from jaxq.quantization.qarray import dequantize

    return jax.lax.dot_general(
        dequantize(a, jnp.float32), dequantize(b, jnp.float32), (((1,), (1,)), ((), ())),
        precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32,
    )  # fmt: skip


def pad_to(x, multiples):
    """``x`` zero-padded at the end of each axis to a multiple of ``multiples[axis]``
    (``None`` or 1: as it is); ``x`` itself when nothing needs padding.

    Pallas's Triton backend neither masks nor bounds-checks a block that runs past the end
    of its array: a partial tile reads past the end and, in a row-major array, writes the
    columns beyond the last into the next row. Interpret mode pads such blocks, so its
    tests cannot see this. The Triton kernels here therefore call ``pallas_call`` only on
    whole tiles: they pad their operands with this and slice the results.

    Example:
        >>> pad_to(jnp.ones((5, 100)), (16, 64)).shape
        (16, 128)
    """
    pads = [(0, -d % (mult or 1)) for d, mult in zip(x.shape, multiples, strict=True)]
    return jnp.pad(x, pads) if any(p for _, p in pads) else x


def dividing_tile(n: int, preferred: int, smallest: int = 16) -> int:
    """The largest power-of-two tile from ``preferred`` down to ``smallest`` that divides
    ``n``, else ``preferred`` (then the operand is padded: :func:`pad_to`).

    Example:
        >>> dividing_tile(96, 128), dividing_tile(100, 64), dividing_tile(4096, 128)
        (32, 64, 128)
    """
    t = preferred
    while t >= smallest:
        if n % t == 0:
            return t
        t //= 2
    return preferred


def lower_for(fn: Callable, *args, target: str = "cuda", device_kind: str | None = None):
    """Lowers ``jax.jit(fn)`` on abstract ``args`` for a platform this machine lacks.

    ``target="cuda"`` lowers for an abstract GPU of ``device_kind`` (default an H100),
    ``"tpu"`` for an abstract TPU (default a v5e): Pallas reads the device kind, to pick
    the Triton target or the TPU generation, from the abstract mesh in scope. Returns the
    ``jax.stages.Lowered``; nothing is compiled, so the Triton and Mosaic compilers that
    run at compile time on the device have not seen the kernel.
    """
    if target not in ("cuda", "tpu"):
        raise ValueError(f"target must be 'cuda' or 'tpu', got {target!r}")
    kind = device_kind or (H100 if target == "cuda" else TPU_V5E)
    device = jax.sharding.AbstractDevice(device_kind=kind, num_cores=1,
                                         platform="gpu" if target == "cuda" else "tpu")
    mesh = jax.sharding.AbstractMesh((1,), ("_",), (jax.sharding.AxisType.Auto,),
                                     abstract_device=device)
    with jax.sharding.use_abstract_mesh(mesh):
        return jax.jit(fn).trace(*args).lower(lowering_platforms=(target,))
