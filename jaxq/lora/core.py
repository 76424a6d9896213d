"""The LoRA, QLoRA and L4Q products, shared by the NNX and Linen paths.

A layer computes ``y = dot_general(x, W, dimension_numbers)``. Its kernel ``W`` has
*contracted* axes (``in_axes``, summed against ``x``) and *free* axes (in the output).
With ``K`` the product of the contracted sizes and ``N`` that of the free ones, an
adapter is a pair ``A`` of shape ``(K, r)`` and ``B`` of shape ``(r, N)`` (leading axes
for layers stacked by ``nnx.vmap``/``nn.scan``), whose ``K`` and ``N`` run over the
kernel's axes in ascending order, so that

.. math::

    \\Delta W = \\frac{\\alpha}{r} \\, A B  \\quad\\text{(reshaped to the kernel's layout)}

* LoRA / QLoRA (the base ``W_0`` in float, or a packed :class:`jaxq.QArray` served by
  :func:`jaxq.ptq.serving_dot_general`):

  .. math::

      y = x \\cdot \\mathrm{deq}(W_0) + \\frac{\\alpha}{r}\\, \\mathrm{dropout}(x)\\, A B

  computed as two thin products (``x A`` then ``B``), never materializing ``ΔW``.
* L4Q (quantization-aware LoRA): the learned-step quantizer ``Q_s`` (LSQ, see
  :func:`jaxq.lsq_quant`) is applied to the sum, ``y = x · Q_s(W_0 + ΔW)``, through
  :func:`jaxq.ops.dot_general` with a ``learned_step`` recipe, so ``A``, ``B`` and the
  steps all receive gradients (LSQ's for ``s``, straight-through for ``W``). The steps
  are learned as ``log s`` (:func:`steps`).

``A`` starts as Kaiming-uniform noise ``U(-1/√K, 1/√K)`` and ``B`` at zero, so a fresh
adapter leaves the layer's output exactly as it was.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxq import formats as F
from jaxq import ops
from jaxq.ops import operand as O
from jaxq.ops.dims import normalize_dimension_numbers
from jaxq.ops.einsum import einsum_with
from jaxq.ops.spec import Quantizer, Recipe
from jaxq.quantization.qarray import QArray, dequantize

__all__ = ["LoRA", "FLOAT", "L4Q", "L4QRecipe", "AdapterInfo", "kind_of", "base_recipe",
           "serving_recipe", "base_values", "init_a",
           "lora_term", "delta_kernel", "l4q_dot", "with_lora", "steps", "log_steps_from",
           "to_kernel",
           "to_canonical", "map_stack"]  # fmt: skip

_HIGHEST = jax.lax.Precision.HIGHEST

FLOAT = Recipe("float")
"""The rule recipe for an adapter over the layer's own float kernel (plain LoRA)."""


@dataclasses.dataclass(frozen=True)
class LoRA:
    """Adapter hyperparameters (a frozen, hashable dataclass).

    Attributes:
        rank: ``r``, the inner dimension of ``A`` (``K × r``) and ``B`` (``r × N``).
        alpha: the adapter's output is scaled by ``alpha / rank``.
        dropout: probability of dropping an element of the adapter's input ``x`` (the
            base product sees ``x`` unchanged); ``0`` disables it.
        dtype: dtype of ``A`` and ``B``: float32 by default.

    Raises:
        ValueError: a rank below 1, a non-positive or non-finite alpha, a dropout outside
            ``[0, 1)``.

    Example:
        >>> LoRA(rank=8, alpha=16).scale
        2.0
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    dtype: Any = jnp.float32

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"LoRA rank must be a positive int, got {self.rank!r}")
        if not (isinstance(self.alpha, (int, float)) and 0 < self.alpha < math.inf):
            raise ValueError(f"LoRA alpha must be a positive finite number, got {self.alpha!r}")
        if not (isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1):
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        object.__setattr__(self, "dtype", np.dtype(self.dtype))
        if not jnp.issubdtype(self.dtype, jnp.floating):
            raise ValueError(f"LoRA dtype must be a float dtype, got {self.dtype}")

    @property
    def scale(self) -> float:
        """``alpha / rank``."""
        return float(self.alpha) / self.rank


@dataclasses.dataclass(frozen=True)
class L4QRecipe(Recipe):
    """A learned-step weight recipe with the storage of its frozen base (see :func:`L4Q`).

    Attributes:
        base: how ``W_0`` is stored while training: ``None`` (packed by the recipe's own
            quantizer, round-to-nearest), a weight-only scheme (``jaxq.ptq.NF4(64)``...),
            or :data:`FLOAT`.
    """

    base: Recipe | None = None

    def __post_init__(self):
        super().__post_init__()
        b = self.base
        if b is not None and (not isinstance(b, Recipe) or b.lhs is not None or b.learned_step):
            raise ValueError(f"L4Q base must be None, jaxq.lora.FLOAT or a weight-only scheme "
                             f"such as jaxq.ptq.NF4(64), got {b!r}")  # fmt: skip


def L4Q(block_size: int | None = 128, fmt="int4", *, base: Recipe | None = None) -> Recipe:
    """The rule recipe of L4Q: weights served in ``fmt`` with groups of ``block_size``
    along the contraction (``None``: one step per output channel), whose step sizes are
    learned with the adapters.

    The frozen base ``W_0`` is stored, by default, packed by that same quantizer
    (round-to-nearest; the steps start at its scales, so training starts from the RTN
    model). ``base=jaxq.ptq.NF4(64)`` stores it in a finer 4-bit grid instead (QLoRA's
    memory; ``W_0`` then lies off the int4 grid, so small ``ΔW`` move codes), and
    ``base=jaxq.lora.FLOAT`` keeps it in float (L4Q's paper); the steps then start at the
    round-to-nearest scales of ``W_0``.

    Example:
        >>> r = L4Q(64)
        >>> r.learned_step, r.rhs.block_size, r.lhs is None
        (True, 64, True)
    """
    fmt = F.get(fmt)
    if not isinstance(fmt, F.IntFormat) or not fmt.signed:
        raise ValueError(f"L4Q learns the steps of a signed integer format, got {fmt.name}")
    q = Quantizer(fmt, "block", block_size) if block_size else Quantizer(fmt, "row")
    name = f"l4q_{fmt.short}g{block_size}" if block_size else f"l4q_{fmt.short}"
    if base is not None:
        name += f"_on_{base.name}"
    return L4QRecipe(name, None, q, None, learned_step=True, base=base)


KINDS = ("lora", "qlora", "l4q")


def kind_of(recipe: Recipe, where: str) -> str:
    """``"lora"`` (float base), ``"qlora"`` (packed weight-only base) or ``"l4q"``.

    Raises:
        ValueError: a recipe that quantizes activations or learns activation steps.
    """
    if recipe.lhs is not None:
        raise ValueError(f"{where}: recipe {recipe.name!r} quantizes activations; an adapter's "
                         "base is a weight-only scheme (jaxq.ptq.NF4(64), W4(128), W8()...), "
                         "jaxq.lora.L4Q(...) or jaxq.lora.FLOAT")  # fmt: skip
    if recipe.rhs is None:
        return "lora"
    return "l4q" if recipe.learned_step else "qlora"


def serving_recipe(recipe: Recipe | None) -> Recipe | None:
    """The recipe :func:`jaxq.ptq.convert` serves a rule's layers with (``None``: float);
    for a learned-step recipe, its round-to-nearest twin (a merge's plan then carries the
    weights quantized with the learned steps)."""
    if recipe is None or recipe.rhs is None:
        return None
    if recipe.learned_step:
        return Recipe(recipe.name, None, recipe.rhs, None)
    return recipe


def base_recipe(recipe: Recipe | None) -> Recipe | None:
    """The recipe :func:`jaxq.ptq.convert` stores an adapter's frozen base with (``None``:
    the layer keeps its float kernel)."""
    base = getattr(recipe, "base", None) if recipe is not None and recipe.learned_step else None
    if base is not None and base.rhs is None:  # L4Q over a float W_0: stored unquantized
        return Recipe(f"{recipe.name}_base", None, None, None)
    return serving_recipe(base or recipe)


@dataclasses.dataclass(frozen=True)
class AdapterInfo:
    """What one adapted layer was made with (static; recorded to check :func:`merge`).

    Attributes:
        path: the layer's module path.
        op: ``"dot_general"`` or ``"einsum"``.
        kind: ``"lora"``, ``"qlora"`` or ``"l4q"``.
        rule: the ``module_path`` regex of the rule that selected the layer.
        recipe: that rule's recipe (the base's storage, or L4Q's quantizer).
        kernel_shape: the layer's kernel shape (one layer of a stack).
        in_axes: the kernel axes the product contracts (ascending).
        stack: leading axes of stacked layers (``nnx.vmap`` / ``nn.scan``).
        config: the :class:`LoRA` hyperparameters.
    """

    path: str
    op: str
    kind: str
    rule: str
    recipe: Recipe
    kernel_shape: tuple[int, ...]
    in_axes: tuple[int, ...]
    stack: tuple[int, ...]
    config: LoRA

    @property
    def free_axes(self) -> tuple[int, ...]:
        return tuple(i for i in range(len(self.kernel_shape)) if i not in self.in_axes)

    @property
    def k(self) -> int:
        return math.prod(self.kernel_shape[i] for i in self.in_axes)

    @property
    def n(self) -> int:
        return math.prod(self.kernel_shape[i] for i in self.free_axes)

    @property
    def a_shape(self) -> tuple[int, ...]:
        return self.stack + (self.k, self.config.rank)

    @property
    def b_shape(self) -> tuple[int, ...]:
        return self.stack + (self.config.rank, self.n)

    def describe(self) -> str:
        return f"{self.kind} adapter (rule {self.rule!r}, recipe {self.recipe.name!r})"


def check_geometry(path: str, kernel_shape, in_axes, rank: int) -> None:
    """Raises ``ValueError`` when the rank exceeds the layer's dimensions."""
    k = math.prod(kernel_shape[i] for i in in_axes)
    n = math.prod(d for i, d in enumerate(kernel_shape) if i not in in_axes)
    if rank > min(k, n):
        raise ValueError(
            f"jaxq.lora: layer {path!r} with kernel {tuple(kernel_shape)} contracts K={k} "
            f"into N={n} outputs; an adapter of rank {rank} exceeds min(K, N) = {min(k, n)} "
            f"(A would be ({k}, {rank}), B ({rank}, {n})); choose rank <= {min(k, n)} or "
            "exclude the layer with jaxq.Rule(path, recipe=None)"
        )


def init_a(key: jax.Array, shape, dtype) -> jax.Array:
    """Kaiming-uniform ``U(-1/√K, 1/√K)`` with ``K = shape[-2]`` (PEFT's default)."""
    bound = 1.0 / math.sqrt(shape[-2])
    return jax.random.uniform(key, shape, dtype, -bound, bound)


def _contraction(x_ndim: int, dims, info: AdapterInfo, where: str):
    """The ``x`` axes paired with ``info.in_axes`` in ascending kernel order, and the rest."""
    (lc, rc), (lb, rb) = normalize_dimension_numbers(dims, where)
    if lb or rb:
        raise ValueError(f"{where}: the layer's product has batch dimensions {dims}; "
                         "adapters cover products without them")  # fmt: skip
    if tuple(sorted(rc)) != info.in_axes:
        raise ValueError(f"{where}: the layer contracts kernel axes {tuple(rc)}, but its "
                         f"adapter was made for axes {info.in_axes} of kernel "
                         f"{info.kernel_shape}")  # fmt: skip
    order = sorted(range(len(rc)), key=lambda i: rc[i])
    lc_sorted = tuple(lc[i] for i in order)
    lf = tuple(i for i in range(x_ndim) if i not in lc)
    return lc_sorted, lf


def lora_term(x, dims, a, b, info: AdapterInfo, dropout=None) -> jax.Array:
    """``(alpha/r) · dropout(x) A B``, shaped like ``dot_general(x, W, dims)``.

    Args:
        x: the layer's input to its product.
        dims: the product's dimension numbers.
        a, b: one layer's adapter (no stack axes).
        info: the adapter's :class:`AdapterInfo`.
        dropout: ``None`` or a function applied to ``x`` viewed as ``(M, K)``.
    """
    where = f"jaxq.lora layer {info.path!r}"
    x = jnp.asarray(x)
    lc, lf = _contraction(x.ndim, dims, info, where)
    x2 = x.transpose(lf + lc).reshape(-1, info.k).astype(a.dtype)
    if dropout is not None:
        x2 = dropout(x2)
    t = jnp.dot(x2, a, precision=_HIGHEST, preferred_element_type=jnp.float32)
    y = jnp.dot(t, b.astype(jnp.float32), precision=_HIGHEST) * np.float32(info.config.scale)
    free = tuple(info.kernel_shape[i] for i in info.free_axes)
    return y.reshape(tuple(x.shape[i] for i in lf) + free)


def delta_kernel(a, b, info: AdapterInfo) -> jax.Array:
    """``ΔW = (alpha/r) A B`` in the kernel's layout (float32; stack axes kept)."""
    s = a.ndim - 2
    d = jnp.matmul(a.astype(jnp.float32), b.astype(jnp.float32), precision=_HIGHEST)
    d = d * np.float32(info.config.scale)
    shape = info.kernel_shape
    d = d.reshape(a.shape[:s] + tuple(shape[i] for i in info.in_axes)
                  + tuple(shape[i] for i in info.free_axes))  # fmt: skip
    inv = np.argsort(info.in_axes + info.free_axes)
    return d.transpose(tuple(range(s)) + tuple(s + int(j) for j in inv))


def _rhs_perm(ndim: int, dims) -> tuple[int, ...]:
    (_, rc), (_, rb) = dims
    rf = tuple(i for i in range(ndim) if i not in rc and i not in rb)
    return tuple(rb) + rf + tuple(rc)


def to_kernel(w3: jax.Array, kernel_shape, dims) -> jax.Array:
    """A canonical ``(B, N, K)`` weight (one layer) back in the kernel's layout."""
    perm = _rhs_perm(len(kernel_shape), dims)
    return w3.reshape(tuple(kernel_shape[i] for i in perm)).transpose(np.argsort(perm))


def to_canonical(w: jax.Array, dims) -> jax.Array:
    """A kernel (one layer) in the canonical ``(B, N, K)`` view of its product."""
    perm = _rhs_perm(w.ndim, dims)
    (_, rc), (_, rb) = dims
    b = math.prod(w.shape[i] for i in rb)
    k = math.prod(w.shape[i] for i in rc)
    return w.transpose(perm).reshape(b, -1, k)


def map_stack(fn, *trees, n: int):
    """``fn`` applied per layer over ``n`` leading stack axes (nested ``jax.vmap``)."""
    for _ in range(n):
        fn = jax.vmap(fn)
    return fn(*trees)


def steps(log_steps: jax.Array) -> jax.Array:
    """L4Q's step sizes ``s = exp(log s)`` from the learned parameter ``log s``.

    The steps are learned in the log domain: always positive, and an optimizer's update
    changes them by a relative amount (Adam moves ``log s`` by about the learning rate,
    whatever the weights' scale). The gradient is LSQ's, ``∂L/∂log s = s · ∂L/∂s``.
    """
    return jnp.exp(log_steps)


def base_values(qw) -> jax.Array:
    """``W_0`` of a stored base, float32 in its canonical ``(B, N, K)`` view (one layer)."""
    w = qw.weight
    return dequantize(w, jnp.float32) if isinstance(w, QArray) else w.astype(jnp.float32)


def log_steps_from(qw, q: Quantizer, n_stack: int = 0) -> jax.Array:
    """L4Q's initial ``log s``: the round-to-nearest scales of ``W_0`` under ``q`` (exactly
    the stored scales when the base is packed by ``q`` itself), in the shape
    :func:`jaxq.recipes.init_steps` gives (``(1, N, K/bs, 1)`` per block, ``(1, N, 1)`` per
    row, ``()`` per tensor), with the ``n_stack`` stack axes leading."""

    def one(qw):
        w = qw.weight
        if isinstance(w, QArray) and qw.recipe is not None and qw.recipe.rhs == q:
            s = w.scale
        else:
            s = O.quantize_operand(base_values(qw), q, where="jaxq.lora L4Q steps").scale
        s = jnp.log(s.astype(jnp.float32))
        return s[..., None] if q.granularity == "block" else s

    return map_stack(one, qw, n=n_stack)


def _check_call(rhs, dims, qw, where):
    dims = normalize_dimension_numbers(dims, where)
    if tuple(jnp.shape(rhs)) != tuple(qw.kernel_shape) or dims != qw.dimension_numbers:
        raise ValueError(f"{where}: the layer calls its product with kernel "
                         f"{tuple(jnp.shape(rhs))} and dimension_numbers {dims}; its base was "
                         f"stored for {tuple(qw.kernel_shape)} and "
                         f"{qw.dimension_numbers}")  # fmt: skip
    return dims


def l4q_dot(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None,
            out_sharding=None, *, qw, a, b, log_steps, info: AdapterInfo):  # fmt: skip
    """L4Q's product ``x · Q_s(deq(W_0) + ΔW)`` in the layer's ``dot_general`` slot.

    ``rhs`` is the kernel placeholder of a packed base (shape-checked only); ``qw`` the
    base's :class:`jaxq.ptq.QuantizedWeight`; ``log_steps`` the learned ``log s``.
    """
    where = f"jaxq.lora L4Q layer {info.path!r}"
    dims = _check_call(rhs, dimension_numbers, qw, where)
    w0 = to_kernel(base_values(qw), qw.kernel_shape, dims)
    w = w0 + delta_kernel(a, b, info)
    out_dtype = preferred_element_type or jnp.result_type(lhs, rhs)
    return ops.dot_general(lhs, w, dims, precision, out_dtype, out_sharding, recipe=info.recipe,
                           steps={"lhs": None, "rhs": steps(log_steps)})  # fmt: skip


def with_lora(op: str, base, lora_dot):
    """A slot function: the layer's base product plus the adapter's term.

    ``base`` has the slot's own signature (``dot_general``'s, or ``einsum_op``'s for
    ``op="einsum"``); ``lora_dot(lhs, rhs, dims)`` returns the adapter's term of a
    ``dot_general`` call.
    """
    if op == "dot_general":

        def dot(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None,
                **kwargs):  # fmt: skip
            y = base(lhs, rhs, dimension_numbers, precision, preferred_element_type, **kwargs)
            return y + lora_dot(lhs, rhs, dimension_numbers).astype(y.dtype)

        return dot

    def term(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
        return lora_dot(lhs, rhs, dimension_numbers)

    def einsum_op(subscripts, lhs, rhs, precision=None, preferred_element_type=None, **kwargs):
        y = base(subscripts, lhs, rhs, precision=precision,
                 preferred_element_type=preferred_element_type, **kwargs)  # fmt: skip
        return y + einsum_with(term, subscripts, lhs, rhs).astype(y.dtype)

    return einsum_op


def as_slot(op: str, dot):
    """A ``dot_general``-signature function as the slot of ``op``."""
    if op == "dot_general":
        return dot

    def einsum_op(subscripts, lhs, rhs, precision=None, preferred_element_type=None, **_):
        return einsum_with(dot, subscripts, lhs, rhs, precision=precision,
                           preferred_element_type=preferred_element_type)  # fmt: skip

    return einsum_op


def dropout_fn(rate: float, key: jax.Array):
    """Inverted dropout with an explicit key (the Linen path; NNX uses ``nnx.Dropout``)."""

    def apply(x):
        keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
        return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))

    return apply
