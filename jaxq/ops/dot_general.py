"""``jaxq.ops.dot_general``: ``jax.lax.dot_general`` with quantized operands and its own VJP.

With a :class:`~jaxq.ops.Recipe` whose quantizers are ``Q_l``, ``Q_r``, ``Q_g``:

.. math::

    y = Q_l(x) \\cdot Q_r(w), \\qquad
    \\frac{\\partial L}{\\partial x} = Q_g(g) \\cdot Q_r(w)^\\top, \\qquad
    \\frac{\\partial L}{\\partial w} = Q_l(x)^\\top \\cdot Q_g(g)

each product accumulated in float32 (see :mod:`jaxq.ops.operand` for how it is computed).
A ``None`` quantizer leaves its operand as it is; ``Q_g = None`` is the straight-through
backward of quantization-aware training. The backward pass saves the quantized operands
(codes and scales), never float copies. Recipes that quantize the gradient quantize an
operand with row or ``1 × b`` block scales a second time, along the axis the backward
product contracts, and save that orientation instead (as Transformer Engine does), so
that each backward product has its scales off its contraction (``1 × b`` blocks along the
token axis are formed in place, without a transpose, wherever the weight gradient is
computed from dequantized values); straight-through (QAT)
recipes reuse the forward's quantized values exactly. A backward product of float or
dequantized values contracts its operands along the shared axis as they lie, with no
transposed copy of ``g``, ``x`` or ``w``. Operands without a quantizer are
saved as they are, and so are both operands under ``backward_operands="float"``, whose
backward products are ``Q_g(g) · wᵀ`` and ``xᵀ · Q_g(g)``.

With ``hadamard_wgrad``, both weight-gradient operands are rotated by one random 16-point
block Hadamard transform along the token axis before they are quantized; the rotation
cancels in the exact product. The token axis is zero-padded to a multiple of 16 first.

Recipe state (:class:`~jaxq.ops.OpState`) enters as an argument; its "gradient" returns
the amaxes observed in this call (see :func:`jaxq.recipes.update`). Learned step sizes
(``recipe.learned_step``) enter as ``steps`` and are differentiated like parameters; that
product is rematerialized, so its backward keeps only the operands and the steps.

Shapes that an FP8 GEMM would not take (dimensions not multiples of 16) are computed from
the same FP8 codes in float32: the values are the same, only the kernel differs. A block
size that does not divide its axis is an error.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxq.kernels import registry as kernel_registry
from jaxq.ops import operand as O
from jaxq.ops.dims import Canonical, canonicalize
from jaxq.ops.hadamard import hadamard
from jaxq.ops.lsq import lsq_product
from jaxq.ops.spec import OpState, Recipe
from jaxq.ops.vjp_state import Bits, check_operands, check_state, history_amax, state_cotangent

__all__ = ["dot_general", "residual_nbytes", "check_state"]

_HADAMARD_BLOCK = 16
_KEY_NAMES = ("lhs", "rhs", "rhs_t", "lhs_t", "grad", "grad_t", "hadamard")


@dataclasses.dataclass(frozen=True)
class _Config:
    recipe: Recipe
    canon: Canonical
    lhs_dtype: Any
    rhs_dtype: Any
    op: str


def _keys(state: OpState | None, recipe: Recipe) -> dict[str, jax.Array | None]:
    if not recipe.needs_key:
        return dict.fromkeys(_KEY_NAMES)
    keys = jax.random.split(state.key(), len(_KEY_NAMES))
    return {name: keys[i] for i, name in enumerate(_KEY_NAMES)}


def _block(q) -> int:
    return q.block_size if q is not None and q.granularity == "block" else 1


def _tile(q) -> int | None:
    """The side of ``q``'s square tiles (``"block2d"``), else ``None``."""
    return q.block_size if q is not None and q.granularity == "block2d" else None


def _multiple_m(cfg: _Config) -> int:
    """What the token axis (the weight gradient's contraction) is zero-padded to a multiple of."""
    r = cfg.recipe
    hb = _HADAMARD_BLOCK if r.hadamard_wgrad else 1
    return math.lcm(_block(r.backward_quantizer("lhs")), _block(r.grad), hb)


def _multiple_n(cfg: _Config) -> int:
    """What the output axis (the input gradient's contraction) is zero-padded to a multiple
    of: the gradient's blocks, and the weight's where it is re-quantized along that axis."""
    wb = cfg.recipe.backward_quantizer("rhs") if _w_ready(cfg) else None
    return math.lcm(_block(wb), _block(cfg.recipe.grad))


def _pad(x: jax.Array, multiple: int) -> jax.Array:
    """Zero-pads the last (contraction) axis to a multiple: zeros add nothing to a product."""
    extra = -x.shape[-1] % multiple
    return x if not extra else jnp.pad(x, ((0, 0), (0, 0), (0, extra)))


def _pad_rows(x: jax.Array, rows: int) -> jax.Array:
    """Zero-pads the row (token) axis of a canonical ``(B, M, K)`` array to ``rows``."""
    extra = rows - x.shape[1]
    return x if not extra else jnp.pad(x, ((0, 0), (0, extra), (0, 0)))


def _padded_m(cfg: _Config, m: int) -> int:
    return -(-m // _multiple_m(cfg)) * _multiple_m(cfg)


def _wgrad_in_place(cfg: _Config) -> bool:
    """Whether the weight gradient quantizes its operands along the token axis in place.

    Recipes whose gradient has ``1 × b`` blocks contract those blocks along the tokens in
    the weight gradient. Where that product is computed from dequantized values (every
    platform without a block-scaled GEMM for the format), the blocks are formed along the
    token axis of the ``(B, M, ·)`` arrays as they lie, and the product contracts that axis:
    the same codes and scales as transposing first, without moving the float data (on CPU
    a transpose-then-quantize took twice as long as quantizing in place). With
    ``hadamard_wgrad`` the operands are rotated along the token axis after a transpose.
    """
    r = cfg.recipe
    xb = r.backward_quantizer("lhs")
    blocked = lambda q: q is not None and q.granularity == "block"  # noqa: E731
    return (blocked(r.grad) and not r.hadamard_wgrad
            and (xb is None or xb.orientation_free or blocked(xb))
            and not O.scaled_matmul_available())  # fmt: skip


def _align(a: O.Operand, b: O.Operand) -> tuple[O.Operand, O.Operand]:
    """Pads the shorter contraction axis of two canonical operands to the longer one."""
    n = max(a.shape[-1], b.shape[-1])

    def fit(x):
        if x.shape[-1] == n:
            return x
        return jnp.pad(O.to_float(x), ((0, 0), (0, 0), (0, n - x.shape[-1])))

    return fit(a), fit(b)


def _forward(lhs, rhs, state, cfg: _Config):
    r, c = cfg.recipe, cfg.canon
    keys = _keys(state, r)
    x3, w3 = c.lhs(lhs), c.rhs(rhs)
    la, ra = history_amax(state, r, "lhs"), history_amax(state, r, "rhs")
    wb, xb = r.backward_quantizer("rhs"), r.backward_quantizer("lhs")
    xq, xq_t = _quantize(x3, r.lhs, la, keys["lhs"], f"{cfg.op} lhs",
                         xb is not None and not _x_ready(cfg) and not _wgrad_in_place(cfg))
    wq, wq_t = _quantize(w3, r.rhs, ra, keys["rhs"], f"{cfg.op} rhs",
                         wb is not None and not _w_ready(cfg))  # fmt: skip
    y3 = O.matmul(xq, wq)

    # The input gradient contracts w along N: saved as (B, K, N) or transposed later.
    if wq_t is not None:
        w_saved = _Transposed(wq_t)
    elif not _w_ready(cfg):
        w_saved = w3 if wb is None else wq
    else:
        wt = _pad(w3.transpose(0, 2, 1), _multiple_n(cfg))
        where = f"{cfg.op} rhs (transposed)"
        w_saved = O.quantize_operand(wt, wb, key=keys["rhs_t"], where=where)
    # The weight gradient contracts x along M (tokens): saved as (B, K, M) or transposed.
    if xq_t is not None:
        x_saved = _Transposed(xq_t)
    elif not _x_ready(cfg):
        x_saved = x3 if xb is None else xq
    elif _wgrad_in_place(cfg):
        x_saved = O.quantize_operand(
            _pad_rows(x3, _padded_m(cfg, x3.shape[1])), xb, amax=la, key=keys["lhs_t"],
            where=f"{cfg.op} lhs (blocks along the tokens)", axis=1,
        )  # fmt: skip
    else:
        xt = _pad(x3.transpose(0, 2, 1), _multiple_m(cfg))
        if r.hadamard_wgrad:
            xt = hadamard(xt, -1, key=keys["hadamard"], block_size=_HADAMARD_BLOCK)
        x_saved = O.quantize_operand(
            xt, xb, amax=la, key=keys["lhs_t"], where=f"{cfg.op} lhs (transposed)"
        )
    observed = {
        "lhs": O.observe_amax(x3) if "lhs" in r.delayed_roles else None,
        "rhs": O.observe_amax(w3) if "rhs" in r.delayed_roles else None,
    }
    res = (Bits.wrap((w_saved, x_saved)), keys, history_amax(state, r, "grad"), observed,
           state)  # fmt: skip
    return c.out(y3), res


class _Transposed(NamedTuple):
    """A saved operand already in its backward product's orientation: the transposed copy
    that the cast-transpose kernel writes beside the codes (``(B, K, R)`` for ``(B, R, K)``)."""

    operand: Any


def _quantize(x3, q, amax, key, where: str, transposed: bool):
    """``(quantize_operand(x3, q), its transpose or None)``: with ``transposed``, the copy
    where a cast-transpose kernel writes it in the same pass."""
    if transposed:
        return O.quantize_operand_and_transpose(x3, q, amax=amax, key=key, where=where)
    return O.quantize_operand(x3, q, amax=amax, key=key, where=where), None


def _oriented(saved, ready: bool):
    """A saved operand in its backward product's orientation."""
    if isinstance(saved, _Transposed):
        return saved.operand
    return saved if ready else O.transpose(saved)


def _w_ready(cfg: _Config) -> bool:
    """Whether the weight is saved already in the input gradient's orientation.

    Only recipes that quantize the gradient re-quantize along the other axis (their
    backward products are low-precision GEMMs that need scales off the contraction). With
    a float gradient (QAT) the backward uses the forward's quantized values exactly.
    """
    q = cfg.recipe.backward_quantizer("rhs")
    return cfg.recipe.grad is not None and q is not None and not q.orientation_free


def _x_ready(cfg: _Config) -> bool:
    """Whether the activations are saved already in the weight gradient's orientation."""
    q = cfg.recipe.backward_quantizer("lhs")
    requantize = cfg.recipe.grad is not None and q is not None and not q.orientation_free
    return cfg.recipe.hadamard_wgrad or requantize


def _backward(cfg: _Config, res, g):
    r, c = cfg.recipe, cfg.canon
    saved, keys, g_amax, observed, state = res
    w_saved, x_saved = saved.unwrap()
    g3 = c.out3(g)
    in_place = _wgrad_in_place(cfg)
    transposed = (r.grad is not None and r.grad.orientation_free and not r.hadamard_wgrad
                  and not in_place)  # fmt: skip
    gq, gq_t = _quantize(_pad(g3, _multiple_n(cfg)), r.grad, g_amax, keys["grad"],
                         f"{cfg.op} grad", transposed)  # fmt: skip
    # w (B, N, K) contracted along N as it lies, where no GEMM needs it transposed
    dx3 = None
    if not _w_ready(cfg) and not isinstance(w_saved, _Transposed):
        n = gq.shape[2]  # the gradient's output axis, zero-padded to its blocks
        tile = _tile(r.backward_quantizer("rhs"))
        if tile and O.is_quantized(w_saved) and w_saved.shape[1] == n:
            # square tiles are blocks along N as well: a block-scaled kernel's operand
            dx3 = O.kernel_product(gq, O.transpose_tiles(w_saved, tile))
        if dx3 is None:
            w = w_saved if w_saved.shape[1] == n else _pad_rows(O.to_float(w_saved), n)
            dx3 = O.contract(gq, w, (2, 1))
    if dx3 is None:
        dx3 = O.matmul(*_align(gq, _oriented(w_saved, _w_ready(cfg))))

    if in_place:
        dw3 = _wgrad_along_tokens(cfg, g3, x_saved, g_amax, keys["grad_t"])
    else:
        dw3 = _wgrad_transposed(cfg, g3, gq, gq_t, x_saved, g_amax, keys)

    observed = dict(observed)
    if "grad" in r.delayed_roles:
        observed["grad"] = O.observe_amax(g3)
    dlhs = c.lhs_back(dx3).astype(cfg.lhs_dtype)
    drhs = c.rhs_back(dw3).astype(cfg.rhs_dtype)
    return dlhs, drhs, state_cotangent(state, observed)


def _wgrad_along_tokens(cfg: _Config, g3, x_saved, g_amax, key):
    """``Σ_m deq(Q_g(g))_{bmn} x_{bmk}`` with ``g``'s blocks along the tokens in place."""
    rows = _padded_m(cfg, g3.shape[1])
    gq = O.quantize_operand(_pad_rows(g3, rows), cfg.recipe.grad, amax=g_amax, key=key,
                            where=f"{cfg.op} grad (blocks along the tokens)", axis=1)  # fmt: skip
    if O.is_quantized(x_saved):
        # where a block-scaled kernel runs, the codes are transposed (blocks along the
        # tokens become blocks along its contraction) rather than dequantized
        dw3 = O.kernel_product(O.transpose(gq), O.transpose(x_saved))
        if dw3 is not None:
            return dw3
    return O.contract(O.to_float(gq), _pad_rows(O.to_float(x_saved), rows), (1, 1))


def _wgrad_transposed(cfg: _Config, g3, gq, gq_t, x_saved, g_amax, keys):
    """The weight gradient as a canonical product of the transposed operands (``gq_t``:
    ``gq``'s transposed copy where the kernel that quantized it wrote one, else ``None``)."""
    r = cfg.recipe
    if r.hadamard_wgrad or not (r.grad is None or r.grad.orientation_free):
        gt = _pad(g3.transpose(0, 2, 1), _multiple_m(cfg))
        if r.hadamard_wgrad:
            gt = hadamard(gt, -1, key=keys["hadamard"], block_size=_HADAMARD_BLOCK)
        gq_t = O.quantize_operand(gt, r.grad, amax=g_amax, key=keys["grad_t"],
                                  where=f"{cfg.op} grad (transposed)")  # fmt: skip
    else:
        # gq: g itself for a straight-through gradient, else its tensor-scaled codes
        # g and x contracted along the tokens as they lie, if possible
        if gq_t is None and not _x_ready(cfg) and not isinstance(x_saved, _Transposed):
            dw3 = O.contract(gq, x_saved, (1, 1))
            if dw3 is not None:
                return dw3
        gq_t = O.transpose(gq) if gq_t is None else gq_t
    return O.matmul(*_align(gq_t, _oriented(x_saved, _x_ready(cfg))))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _qdot(lhs, rhs, state, cfg):
    return _forward(lhs, rhs, state, cfg)[0]


def _qdot_fwd(lhs, rhs, state, cfg):
    return _forward(lhs, rhs, state, cfg)


_qdot.defvjp(_qdot_fwd, _backward)


@functools.partial(jax.jit, static_argnums=(3, 4))
def _qdot_jit(lhs, rhs, state, cfg, kernels):
    """``_qdot`` as one program: an eager call compiles the forward (and its backward) once
    instead of dispatching every primitive of the quantizers on its own; under an outer
    transformation the inner jit is inlined. ``kernels`` (the ``JAXQ_KERNELS`` setting,
    which the products' kernel dispatch reads while tracing) keys the cache."""
    del kernels
    return _qdot(lhs, rhs, state, cfg)


def dot_general(
    lhs: jax.Array,
    rhs: jax.Array,
    dimension_numbers,
    precision=None,
    preferred_element_type=None,
    out_sharding=None,
    *,
    recipe: Recipe | None,
    state: OpState | None = None,
    steps: dict | None = None,
) -> jax.Array:
    """``jax.lax.dot_general`` whose three training products are quantized by ``recipe``.

    ``functools.partial(jaxq.ops.dot_general, recipe=r)`` drops into any Flax layer's
    ``dot_general`` slot.

    Args:
        lhs, rhs, dimension_numbers: as for :func:`jax.lax.dot_general`.
        precision: accepted for signature compatibility; quantized products accumulate in
            float32.
        preferred_element_type: output dtype (default ``result_type(lhs, rhs)``).
        out_sharding: a sharding constraint for the output.
        recipe: a :class:`~jaxq.ops.Recipe`; ``None`` calls ``jax.lax.dot_general``.
        state: the recipe's :class:`~jaxq.ops.OpState` (``recipe.init(key)``), if it has one.
        steps: learned step sizes ``{"lhs": ..., "rhs": ...}`` for ``recipe.learned_step``
            (see :func:`jaxq.recipes.init_steps`).

    Returns:
        The product, of the shape ``jax.lax.dot_general`` gives.

    Raises:
        TypeError: integer or float64 operands.
        ValueError: mismatched shapes, a block size that does not divide its axis, or a
            state that does not match the recipe; raised at trace time.

    Example:
        >>> import jax, jax.numpy as jnp, jaxq
        >>> x = jax.random.normal(jax.random.key(0), (8, 64))
        >>> w = jax.random.normal(jax.random.key(1), (64, 32))
        >>> dn = (((1,), (0,)), ((), ()))
        >>> y = jaxq.ops.dot_general(x, w, dn, recipe=jaxq.recipes.FP8Current())
        >>> float(jnp.linalg.norm(y - x @ w) / jnp.linalg.norm(x @ w)) < 0.05
        True
    """
    op = f"jaxq.ops.dot_general[{getattr(recipe, 'name', None)}]"
    if recipe is None:
        kw = {} if out_sharding is None else {"out_sharding": out_sharding}
        return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision, preferred_element_type,
                                   **kw)  # fmt: skip
    if not isinstance(recipe, Recipe):
        raise TypeError(f"{op}: recipe must be a jaxq.ops.Recipe or None, got {recipe!r}")
    lhs, rhs = jnp.asarray(lhs), jnp.asarray(rhs)
    check_operands(op, lhs, rhs)
    canon = canonicalize(lhs.shape, rhs.shape, dimension_numbers, op)
    out_dtype = preferred_element_type or jnp.result_type(lhs, rhs)
    if recipe.learned_step:
        if not isinstance(steps, dict) or any(
            steps.get(role) is None for role in ("lhs", "rhs") if getattr(recipe, role)
        ):
            raise ValueError(
                f"{op}: recipe {recipe.name!r} learns step sizes: pass "
                "steps=jaxq.recipes.init_steps(recipe, lhs, rhs, dimension_numbers)"
            )
        out = lsq_product(lhs, rhs, steps.get("lhs"), steps.get("rhs"), canon, recipe)
    else:
        check_state(recipe, state, op)
        cfg = _Config(recipe, canon, lhs.dtype, rhs.dtype, op)
        out = _qdot_jit(lhs, rhs, state, cfg, kernel_registry.forced())
    out = out.astype(out_dtype)
    if out_sharding is not None:
        out = jax.lax.with_sharding_constraint(out, out_sharding)
    return out


def residual_nbytes(recipe: Recipe, lhs, rhs, dimension_numbers) -> int:
    """Bytes the backward pass keeps for one call (quantized operands and their scales).

    ``lhs``/``rhs`` may be arrays or ``jax.ShapeDtypeStruct``. ``learned_step`` recipes
    are differentiated by JAX (LSQ needs ``x / step`` in float): their count is what
    the VJP closes over (``jax.vjp``'s residuals), with per-tensor steps.

    Example:
        >>> import jax, jax.numpy as jnp, jaxq
        >>> x = jax.ShapeDtypeStruct((256, 512), jnp.float32)
        >>> w = jax.ShapeDtypeStruct((512, 512), jnp.float32)
        >>> dn = (((1,), (0,)), ((), ()))
        >>> residual_nbytes(jaxq.recipes.FP8Current(), x, w, dn) / ((256 + 512) * 512 * 4)
        0.25...
    """
    canon = canonicalize(lhs.shape, rhs.shape, dimension_numbers)
    if recipe.learned_step:  # differentiated by JAX: count what autodiff saves
        steps = {
            "lhs": None if recipe.lhs is None else jnp.ones((), jnp.float32),
            "rhs": None if recipe.rhs is None else jnp.ones((), jnp.float32),
        }

        def residuals(x, w):
            f = functools.partial(dot_general, dimension_numbers=dimension_numbers,
                                  recipe=recipe, steps=steps)  # fmt: skip
            return jax.tree.leaves(jax.vjp(lambda x, w: f(x, w), x, w)[1])

        saved = jax.eval_shape(residuals, lhs, rhs)
        return int(sum(np.prod(a.shape) * np.dtype(a.dtype).itemsize for a in saved))
    cfg = _Config(recipe, canon, lhs.dtype, rhs.dtype, "residual_nbytes")
    key = jax.random.key(0) if recipe.needs_key else None

    def f(lhs, rhs):
        state = recipe.init(key)
        return _forward(lhs, rhs, state, cfg)[1][0].unwrap()

    saved = jax.eval_shape(f, lhs, rhs)
    return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(saved)))
