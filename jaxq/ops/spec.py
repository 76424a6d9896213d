"""What a quantized matmul does to each operand: ``Quantizer``, ``Recipe`` and ``OpState``.

A matmul ``out = lhs · rhs`` (any ``dot_general``) runs three products in training:

* forward: ``out = Q(lhs) · Q(rhs)``;
* input gradient (dgrad): ``d lhs = Q(g) · Q(rhs)ᵀ``;
* weight gradient (wgrad): ``d rhs = Q(lhs)ᵀ · Q(g)``.

A :class:`Recipe` names one :class:`Quantizer` per operand: ``lhs`` (activations in a Flax
layer), ``rhs`` (weights) and ``grad`` (the output gradient, in both backward products).
``None`` keeps an operand in its own precision. With ``grad=None`` the backward products
use the quantized forward operands with a float gradient: the straight-through estimator
of quantization-aware training, exactly the gradient of the fake-quantized function.

Granularity is stated relative to each product's contraction axis ``K``, for an operand
viewed as ``(rows, K)``:

* ``"tensor"``: one scale;
* ``"row"``: one scale per row (per token for activations, per output channel for
  weights); it factors out of the product;
* ``"block"``: ``1 × block_size`` tiles along ``K`` (DeepSeek-V3 activations, MX, NVFP4);
* ``"block2d"``: ``block_size × block_size`` tiles, the same in both orientations, so a
  weight is quantized identically in the forward and the backward product.

Row and block quantization depend on the orientation; the weight gradient contracts the
activations along the token axis, so such an operand is quantized a second time along
that axis in the forward pass and saved in both orientations (as Transformer Engine does).

Scaling: ``"current"`` takes the amax of the tensor being quantized; ``"delayed"`` takes
the maximum (or the most recent entry) of an amax history kept in :class:`OpState`
(``scale = amax · 2^margin / max``; an all-zero history falls back to the current amax, so
the first step never clips); ``"static"`` uses ``static_scale``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import jax
import jax.numpy as jnp

from jaxq import formats as F
from jaxq.quantization.calibration import Absmax, Calibration

__all__ = ["Quantizer", "Recipe", "OpState"]

Granularity = Literal["tensor", "row", "block", "block2d"]
Scaling = Literal["current", "delayed", "static"]
_GRANULARITIES = ("tensor", "row", "block", "block2d")
_SCALINGS = ("current", "delayed", "static")


@dataclasses.dataclass(frozen=True)
class Quantizer:
    """How one operand is quantized (a frozen, hashable dataclass).

    Attributes:
        fmt: element or block format, or its name (``"e4m3"``, ``"int4"``, ``"nvfp4"``...).
        granularity: ``"tensor"``, ``"row"``, ``"block"`` or ``"block2d"`` (module docstring).
        block_size: tile size for ``"block"``/``"block2d"``; block formats fix their own
            (32 for MX, 16 for NVFP4) and ``block2d`` uses it for both tile sides.
        scaling: ``"current"``, ``"delayed"`` (history in :class:`OpState`) or ``"static"``.
        static_scale: the scale of ``"static"`` scaling (stored value ``cast(x / s) · s``).
        margin: delayed scaling's ``scale = amax · 2^margin / max``.
        rounding: ``"nearest"`` or ``"stochastic"`` (the key comes from :class:`OpState`).
        calibration: :class:`jaxq.Absmax` (default), ``Percentile``/``MSE``, or
            ``"absmean"``: ``scale = mean |x|`` (BitNet b1.58 ternary weights).
        power_of_two: round each scale up to a power of two (exact rescaling). MX scales
            are always powers of two: ``True`` takes the smallest ``2^e`` with
            ``2^e · max ≥ amax`` of the block (no element saturates; NVIDIA's MXFP8 training
            recipe, qwix), ``False`` the OCP rule ``2^(floor(log2 amax) − emax)``, under
            which a block's largest elements may saturate at the element's max. Not for
            NVFP4, whose block scales are E4M3.

    Example:
        >>> Quantizer("int4", granularity="block", block_size=128).fmt.name
        'int4'
    """

    fmt: Any
    granularity: Granularity = "tensor"
    block_size: int | None = None
    scaling: Scaling = "current"
    static_scale: float = 1.0
    margin: int = 0
    rounding: Literal["nearest", "stochastic"] = "nearest"
    calibration: Calibration | str = Absmax()
    power_of_two: bool = False

    def __post_init__(self):
        fmt = F.get(self.fmt)
        object.__setattr__(self, "fmt", fmt)
        if fmt is F.E8M0:
            raise ValueError("Quantizer fmt=E8M0 is a scale format; it cannot hold operands")
        if isinstance(fmt, F.IntFormat) and not fmt.signed:
            raise ValueError(
                f"Quantizer fmt={fmt.name}: asymmetric formats are not supported in matmuls "
                "(their zero point would enter the product); use a signed format"
            )
        if self.granularity not in _GRANULARITIES:
            raise ValueError(
                f"Quantizer granularity must be one of {_GRANULARITIES}, got {self.granularity!r}"
            )
        if self.scaling not in _SCALINGS:
            raise ValueError(f"Quantizer scaling must be one of {_SCALINGS}, got {self.scaling!r}")
        if self.rounding not in ("nearest", "stochastic"):
            raise ValueError(f"Quantizer rounding must be 'nearest' or 'stochastic', "
                             f"got {self.rounding!r}")  # fmt: skip
        block = isinstance(fmt, F.BlockFormat)
        if block:
            if self.granularity not in ("block", "block2d"):
                raise ValueError(
                    f"block format {fmt.name} needs granularity 'block' or 'block2d', "
                    f"got {self.granularity!r}"
                )
            if self.block_size not in (None, fmt.block_size):
                raise ValueError(
                    f"{fmt.name} has a fixed block size of {fmt.block_size}, "
                    f"got block_size={self.block_size}"
                )
            object.__setattr__(self, "block_size", fmt.block_size)
            if self.power_of_two and not fmt.is_mx:
                raise ValueError(f"power_of_two does not apply to {fmt.name}: its block "
                                 "scales are E4M3, not powers of two")  # fmt: skip
            if self.scaling != "current":
                raise ValueError(f"block format {fmt.name} supports scaling='current' only")
        if self.granularity in ("block", "block2d"):
            if not isinstance(self.block_size, int) or self.block_size < 1:
                raise ValueError(
                    f"granularity {self.granularity!r} needs a positive int block_size, "
                    f"got {self.block_size!r}"
                )
        elif self.block_size is not None:
            raise ValueError(
                f"block_size={self.block_size} needs granularity 'block' or 'block2d', "
                f"got {self.granularity!r}"
            )
        if self.scaling == "delayed" and self.granularity != "tensor":
            raise ValueError("delayed scaling keeps one amax per tensor: use granularity='tensor'")
        if self.scaling == "static" and not (0 < float(self.static_scale) < float("inf")):
            raise ValueError(f"static_scale must be finite and > 0, got {self.static_scale!r}")
        if isinstance(self.calibration, str) and self.calibration != "absmean":
            raise ValueError(
                f"calibration must be Absmax(), Percentile(q), MSE(...) or 'absmean', "
                f"got {self.calibration!r}"
            )
        if self.calibration == "absmean" and (block or self.granularity == "block2d"):
            raise ValueError("calibration='absmean' supports tensor, row and block granularity")

    @property
    def element(self):
        """The element format (the block format's element for MX/NVFP4)."""
        return self.fmt.element if isinstance(self.fmt, F.BlockFormat) else self.fmt

    @property
    def orientation_free(self) -> bool:
        """Whether the quantized tensor is the same whichever axis a product contracts."""
        return self.granularity in ("tensor", "block2d")


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Quantization of the three operands of a matmul, plus what their state needs.

    Build one with the named constructors of :mod:`jaxq.recipes` (``FP8Current()``,
    ``NVFP4()``...) or directly, operand by operand.

    Attributes:
        name: a label for tables and reprs.
        lhs, rhs, grad: :class:`Quantizer` or ``None`` (keep precision). ``grad=None`` gives
            the straight-through (QAT) backward.
        history_length: amax history length of delayed quantizers.
        amax_compute: ``"max"`` or ``"most_recent"`` entry of the history.
        hadamard_wgrad: multiply both weight-gradient operands by a random 16-point block
            Hadamard transform along their contraction (token) axis before quantizing
            (exact in infinite precision: ``H Hᵀ = I``; spreads outliers for FP4).
        learned_step: learn the step sizes of integer ``lhs``/``rhs`` quantizers (LSQ);
            the steps are trainable parameters (see :func:`jaxq.recipes.init_steps`).
        backward_operands: what the two backward products multiply the quantized gradient
            by: ``"quantized"`` (default) the forward operands quantized by ``lhs``/``rhs``
            (re-quantized along the backward contraction where their scales depend on the
            orientation), ``"float"`` the forward operands as they came in, unquantized:
            ``∂x = Q_g(g) · wᵀ``, ``∂w = xᵀ · Q_g(g)``. ``"float"`` skips the second
            quantization of row- and block-scaled operands and keeps more precision in the
            backward, at the cost of saving float operands; it is qwix's backward for
            tiled (MX) formats. It needs a quantized gradient (``grad``).

    Example:
        >>> r = Recipe("w4a8", lhs=Quantizer("e4m3"), rhs=Quantizer("int4", "row"), grad=None)
        >>> r.init() is None  # nothing delayed, nothing stochastic: stateless
        True
    """

    name: str = "custom"
    lhs: Quantizer | None = None
    rhs: Quantizer | None = None
    grad: Quantizer | None = None
    history_length: int = 1024
    amax_compute: Literal["max", "most_recent"] = "max"
    hadamard_wgrad: bool = False
    learned_step: bool = False
    backward_operands: Literal["quantized", "float"] = "quantized"

    def __post_init__(self):
        for role in ("lhs", "rhs", "grad"):
            q = getattr(self, role)
            if q is not None and not isinstance(q, Quantizer):
                raise TypeError(f"Recipe {role} must be a jaxq.ops.Quantizer or None, got {q!r}")
        if not isinstance(self.history_length, int) or self.history_length < 1:
            raise ValueError(f"history_length must be a positive int, got {self.history_length!r}")
        if self.amax_compute not in ("max", "most_recent"):
            raise ValueError(
                f"amax_compute must be 'max' or 'most_recent', got {self.amax_compute!r}"
            )
        if self.backward_operands not in ("quantized", "float"):
            raise ValueError(
                f"backward_operands must be 'quantized' or 'float', got {self.backward_operands!r}"
            )
        if self.backward_operands == "float" and (self.grad is None or self.learned_step):
            raise ValueError(
                "backward_operands='float' needs a quantized gradient (grad) and no learned "
                "steps: the straight-through backward of QAT multiplies by the quantized "
                "forward operands"
            )
        if self.learned_step:
            for role in ("lhs", "rhs"):
                q = getattr(self, role)
                if q is not None and not isinstance(q.fmt, F.IntFormat):
                    raise ValueError(
                        f"learned_step needs integer formats, but {role} is {q.fmt.name}"
                    )
                if q is not None and q.granularity == "block2d":
                    raise ValueError("learned_step supports tensor, row and block granularity")

    def quantizers(self) -> dict[str, Quantizer | None]:
        return {"lhs": self.lhs, "rhs": self.rhs, "grad": self.grad}

    def backward_quantizer(self, role: str) -> Quantizer | None:
        """The quantizer of forward operand ``role`` (``"lhs"``/``"rhs"``) as the backward
        products see it: ``None`` under ``backward_operands="float"``."""
        return None if self.backward_operands == "float" else getattr(self, role)

    @property
    def delayed_roles(self) -> tuple[str, ...]:
        """Roles whose scale comes from an amax history."""
        return tuple(r for r, q in self.quantizers().items() if q and q.scaling == "delayed")

    @property
    def needs_key(self) -> bool:
        """Whether a PRNG key is needed (stochastic rounding or random Hadamard signs)."""
        stochastic = any(q and q.rounding == "stochastic" for q in self.quantizers().values())
        return stochastic or self.hadamard_wgrad

    def init(self, key: jax.Array | None = None) -> OpState | None:
        """The initial state of one op using this recipe, or ``None`` if it needs none.

        Histories start at zero (the first step then scales by the current amax).

        Args:
            key: PRNG key for stochastic rounding / Hadamard signs; required when
                :attr:`needs_key`.

        Raises:
            ValueError: a key is needed but not given.
        """
        hist = {r: jnp.zeros((self.history_length,), jnp.float32) for r in self.delayed_roles}
        if self.needs_key and key is None:
            raise ValueError(
                f"recipe {self.name!r} rounds stochastically or draws Hadamard signs: "
                "init needs key=jax.random.key(...)"
            )
        if not hist and not self.needs_key:
            return None
        seed = None
        if self.needs_key:
            if not jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
                key = jax.random.wrap_key_data(key)
            first = jax.random.randint(key, (), 0, SEED_PERIOD).astype(jnp.float32)
            seed = jnp.stack([first, jnp.float32(0)])
        return OpState(
            lhs_history=hist.get("lhs"),
            rhs_history=hist.get("rhs"),
            grad_history=hist.get("grad"),
            seed=seed,
        )


SEED_PERIOD = 2**24
"""Seeds are float32 integers below ``2**24``, where float32 counts exactly."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class OpState:
    """Per-op recipe state: amax histories (float32, newest first) and a random seed.

    A field is ``None`` when the recipe does not use it. The state is an ordinary pytree of
    float32 arrays (so ``jax.grad`` takes it as it is): thread it through the train step
    like optimizer state, checkpoint it with orbax. ``seed`` is ``[stream, step]``, two
    integers held in float32; the PRNG key of a step is
    ``fold_in(fold_in(key(0), stream), step)``, and :func:`jaxq.recipes.update` counts the
    step on.

    The op's gradient with respect to its state is not a derivative: it carries the
    amaxes observed in this step (forward operands and the backward-only output
    gradient) as the first entry of each history-shaped array, zeros elsewhere.
    :func:`jaxq.recipes.update` rolls them into the history and advances the key. Where
    one state feeds several calls, their observations add up, which overestimates the
    amax (never clips); give each call its own state.
    """

    lhs_history: jax.Array | None = None
    rhs_history: jax.Array | None = None
    grad_history: jax.Array | None = None
    seed: jax.Array | None = None

    def history(self, role: str) -> jax.Array | None:
        return getattr(self, f"{role}_history")

    def key(self) -> jax.Array:
        """This step's PRNG key (only for states with a seed)."""
        s = self.seed.astype(jnp.uint32)
        return jax.random.fold_in(jax.random.fold_in(jax.random.key(0), s[0]), s[1])
