"""Serving weights: ``QuantizedWeight`` and the matmul that runs on it.

A converted layer keeps its kernel as a :class:`QuantizedWeight`: the weight in the
canonical ``(B, N, K)`` orientation of the layer's product (``N`` outputs, contraction
``K`` last, so sub-byte codes are packed two per byte along ``K``), stored as a
:class:`jaxq.QArray`, together with what the activations need at serving time:

* ``act_amax``: the calibrated clipping range of a static activation quantizer;
* ``in_scale``: a per-``K`` divisor of the activations (SmoothQuant / AWQ smoothing that
  was not folded into the previous op), the weight having been multiplied by it;
* ``rotation``: the key of a random block Hadamard transform ``Q = H D`` applied to the
  activations along ``K``; the weight was rotated by the same transform, and
  ``(x Qᵀ)(w Qᵀ)ᵀ = x wᵀ``.

:func:`serving_dot_general` computes, for canonical activations ``x`` of shape
``(B, M, K)``,

.. math::

    y = Q_a\\big(\\mathrm{rot}(x) / s\\big) \\cdot \\mathrm{deq}(W_q)^\\top

through :func:`jaxq.ops.operand.matmul`, the same dispatch point as the training ops
(FP8 and integer GEMMs on their codes, block-scaled GEMMs where available, dequantize
otherwise), so a layer converted from a recipe computes exactly what the recipe's
forward computes on the same weight. Weight-only products (float activations, packed
INT4/NF4/E2M1, MXFP4/NVFP4 or INT8 weights) run
:func:`jaxq.kernels.weight_only_matmul`'s kernel where one is available (GPU); elsewhere
they take the path above unchanged.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxq.ops import operand as O
from jaxq.ops.dims import canonicalize, normalize_dimension_numbers
from jaxq.ops.hadamard import hadamard
from jaxq.ops.lsq import lsq_operand
from jaxq.ops.spec import Recipe
from jaxq.quantization import packing
from jaxq.quantization.codes import encode
from jaxq.quantization.qarray import Layout, QArray

__all__ = ["QuantizedWeight", "serving_dot_general", "rotation_block", "weight_bytes"]


def rotation_block(k: int, max_block: int = 256) -> int:
    """The Hadamard block used along a contraction of length ``k``: the largest power of
    two that divides ``k``, at most ``max_block``.

    Example:
        >>> rotation_block(256), rotation_block(768), rotation_block(100)
        (256, 256, 4)
    """
    return int(min(k & -k, max_block))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    """A layer's kernel converted for serving (a pytree; metadata is static).

    Attributes:
        weight: a :class:`jaxq.QArray` of the canonical ``(B, N, K)`` weight, or the float
            canonical weight for recipes that keep weights in float.
        act_amax: float32 clipping range of a calibrated (``"delayed"``) activation
            quantizer, else ``None``.
        in_scale: float32 ``(K,)`` divisor of the activations, else ``None``.
        rotation: uint32 key data of the activation rotation, else ``None``.
        act_step: the learned activation step of a ``learned_step`` recipe (activations
            are then fake-quantized exactly as in training: ``s · round(clip(x / s))``).
        path: the layer's module path (for messages).
        recipe: the recipe whose ``lhs`` quantizer quantizes the activations.
        kernel_shape: the kernel's shape as the layer's product sees it.
        kernel_dtype: the float kernel's dtype.
        dimension_numbers: the product's ``dot_general`` dimension numbers.
        rotation_block: Hadamard block size of ``rotation``.
    """

    weight: Any
    act_amax: jax.Array | None = None
    in_scale: jax.Array | None = None
    rotation: jax.Array | None = None
    act_step: jax.Array | None = None
    path: str = dataclasses.field(default="", metadata={"static": True})
    recipe: Recipe | None = dataclasses.field(default=None, metadata={"static": True})
    kernel_shape: tuple[int, ...] = dataclasses.field(default=(), metadata={"static": True})
    kernel_dtype: Any = dataclasses.field(default=np.float32, metadata={"static": True})
    dimension_numbers: Any = dataclasses.field(default=None, metadata={"static": True})
    rotation_block: int | None = dataclasses.field(default=None, metadata={"static": True})

    @property
    def nbytes(self) -> int:
        """Real bytes of the stored leaves (codes, scales, activation metadata)."""
        return weight_bytes(self)

    def _rotate(self, x3: jax.Array) -> jax.Array:
        key = jax.random.wrap_key_data(self.rotation)
        # Compiled as one program even while calibration runs the model eagerly
        # (jax.disable_jit): op by op, each butterfly stage would compile on its own.
        with jax.disable_jit(False):
            return hadamard(x3.astype(jnp.float32), -1, key=key, block_size=self.rotation_block)

    def transform_input(self, x3: jax.Array) -> jax.Array:
        """Applies the rotation and the smoothing divisor to canonical activations."""
        if self.rotation is not None:
            x3 = self._rotate(x3)
        if self.in_scale is not None:
            x3 = x3.astype(jnp.float32) / self.in_scale
        return x3

    def transform_weight(self, w3: jax.Array) -> jax.Array:
        """The float weight transformed to match :meth:`transform_input` (``w Qᵀ · s``)."""
        w3 = w3.astype(jnp.float32)
        if self.rotation is not None:
            w3 = self._rotate(w3)
        if self.in_scale is not None:
            w3 = w3 * self.in_scale
        return w3


def lsq_weight(w3: jax.Array, q, step: jax.Array) -> QArray:
    """The QArray of a canonical weight under learned step sizes (LSQ): codes
    ``round(clip(w / s, Q_n, Q_p))`` and scales ``s``, so that it dequantizes to exactly the
    values LSQ's forward uses."""
    b, r, k = w3.shape
    w3 = w3.astype(jnp.float32)
    lo, hi = float(q.fmt.qmin), float(q.fmt.qmax)
    if q.granularity == "block":
        bs = q.block_size
        y = w3.reshape(b, r, k // bs, bs) / step
        layout, scale = Layout("block", (2,), bs), step.reshape(b, r, k // bs)
    elif q.granularity == "row":
        y, layout, scale = w3 / step, Layout("channel", (0, 1)), step.reshape(b, r, 1)
    else:
        y, layout, scale = w3 / step, Layout("tensor"), jnp.reshape(step, ())
    codes = encode(jnp.clip(y, lo, hi), q.fmt).reshape(b, r, k)
    if q.fmt.bits < 8:
        codes = packing.pack(codes, bits=q.fmt.bits)
    return QArray(codes, scale.astype(jnp.float32), None, None, q.fmt, (b, r, k),
                  np.dtype(np.float32), layout).validate()  # fmt: skip


def weight_bytes(tree) -> int:
    """Real bytes of every array leaf of ``tree`` (packed codes count as stored); the same
    count as :func:`jaxq.optim.state_nbytes`.

    Example:
        >>> import jax.numpy as jnp, jaxq
        >>> weight_bytes({"w": jaxq.quantize(jnp.ones((4, 256)), "int4", block_size=128)})
        544
    """
    from jaxq.optim.common import state_nbytes

    return state_nbytes(tree)


def serving_dot_general(
    lhs: jax.Array,
    rhs: jax.Array,
    dimension_numbers,
    precision=None,
    preferred_element_type=None,
    out_sharding=None,
    *,
    weight: QuantizedWeight,
) -> jax.Array:
    """``jax.lax.dot_general(lhs, rhs, ...)`` computed from ``weight`` instead of ``rhs``.

    ``rhs`` is the placeholder a Flax layer passes in its kernel's place; only its shape
    is checked (it is dead code under ``jit``). The product is the quantized forward of
    ``weight.recipe`` on the stored codes (module docstring).

    Raises:
        ValueError: the layer calls the product with another kernel shape or other
            dimension numbers than it did when it was converted.
    """
    where = f"jaxq.ptq serving layer {weight.path!r}"
    if tuple(jnp.shape(rhs)) != tuple(weight.kernel_shape):
        raise ValueError(
            f"{where}: the layer passes a kernel of shape {tuple(jnp.shape(rhs))}, but it was "
            f"converted with kernel shape {tuple(weight.kernel_shape)}"
        )
    dims = normalize_dimension_numbers(dimension_numbers, where)
    if dims != weight.dimension_numbers:
        raise ValueError(
            f"{where}: the layer calls dot_general with dimension_numbers {dims}, but it was "
            f"converted from a call with {weight.dimension_numbers}"
        )
    lhs = jnp.asarray(lhs)
    canon = canonicalize(lhs.shape, weight.kernel_shape, dims, where)
    x3 = weight.transform_input(canon.lhs(lhs))
    act = weight.recipe.lhs if weight.recipe is not None else None
    if act is not None and act.rounding == "stochastic":
        raise ValueError(f"{where}: serving does not round activations stochastically")
    if weight.act_step is not None:
        xq = lsq_operand(x3, act, weight.act_step)
    else:
        xq = O.quantize_operand(x3, act, amax=weight.act_amax, where=f"{where} activations")
    y3 = O.matmul(xq, weight.weight)  # a kernel where one runs here, within its tolerance
    out_dtype = preferred_element_type or jnp.result_type(lhs, rhs)
    out = canon.out(y3).astype(out_dtype)
    if out_sharding is not None:
        out = jax.lax.with_sharding_constraint(out, out_sharding)
    return out


def stacked(leaves: list) -> Any:
    """Stacks per-layer pytrees (same structure) along a new leading axis."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *leaves)
