"""Adam and AdamW with 8-bit, 4-bit and FP8 blockwise-quantized moments (optax transforms).

One step, for each parameter with quantized state (float32 arithmetic):

.. math::

    m &\\leftarrow \\beta_1 \\hat{Q}^{-1}(m) + (1 - \\beta_1) g, \\qquad
    v \\leftarrow \\beta_2 \\hat{Q}^{-1}(v) + (1 - \\beta_2) g^2, \\\\
    u &= \\frac{m / (1 - \\beta_1^t)}{\\sqrt{v} / \\sqrt{1 - \\beta_2^t} + \\epsilon},

then ``m`` and ``v`` are re-quantized with fresh block scales. ``u`` comes from the float32
moments, not from their re-quantized values. ``adamw_*`` then add ``weight_decay * p``
(decoupled, optional ``mask``) and scale by ``-learning_rate`` exactly as ``optax.adamw``.
See :mod:`jaxq.optim.engine` for non-finite gradients and which parameters keep float32
state, and :mod:`jaxq.optim.codecs` for the block layout.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxq.kernels import fused_adam, fused_adam_4bit
from jaxq.optim import blockwise as bw
from jaxq.optim import codecs as cd
from jaxq.optim import maps
from jaxq.optim.common import scale_dtype_of, static_int
from jaxq.optim.engine import init_moments, step_moments

__all__ = [
    "QuantizedAdamState",
    "scale_by_adam_8bit",
    "scale_by_adam_4bit",
    "scale_by_adam_fp8",
    "adam_8bit",
    "adamw_8bit",
    "adamw_4bit",
    "adamw_fp8",
]

_DEFAULT_MIN_SIZE = 4096


class QuantizedAdamState(NamedTuple):
    """State of the quantized Adam transforms.

    Attributes:
        count: int32 step count.
        mu: first moments: a pytree like the parameters whose leaves are
            :class:`~jaxq.optim.codecs.QuantizedMoment` (quantized) or float32 arrays.
        nu: second moments, likewise (4-bit: :class:`~jaxq.optim.codecs.Rank1Moment` for
            parameters with two or more axes).
    """

    count: jax.Array
    mu: Any
    nu: Any


def _kernel_spec(codec, first: bool):
    """What :func:`jaxq.kernels.fused_adam.adam_update` calls this moment's codec, or None."""
    if isinstance(codec, cd.BlockCodec) and codec.bits == 8 and (first or not codec.sign_fix):
        return codec.book
    if isinstance(codec, cd.FP8Codec) and codec.keep_nonzero != first:
        return "e4m3"
    return None


def _as_bits(codes):
    return jax.lax.bitcast_convert_type(codes, jnp.uint8) if codes.dtype != jnp.uint8 else codes


def _fused_4bit(g, states, cs, hyper, implementation, interpret):
    """:func:`jaxq.kernels.fused_adam_4bit.adam_update` on one leaf of 4-bit moments, or
    None where it does not apply: a rank-1 ``v`` needs its matrix view to be ``m``'s row
    layout (not so for a matrix whose short last axis the row layout merges)."""
    m, v = cs
    sm, sv = states
    rank1 = isinstance(v, cd.Rank1Codec)
    bs = m.block_size
    lead, n = bw.row_shape(g.shape, bs)
    if not rank1 and not (isinstance(v, cd.BlockCodec) and v.bits == 4 and not v.sign_fix):
        return None
    if v.block_size != bs or (rank1 and v.view(g.shape) != (*lead, n)):
        return None
    flat = lambda a: a.reshape(-1, a.shape[-1])  # noqa: E731
    g2 = bw.to_blocks(g, bs).reshape(-1, sm.codes.shape[-1] * 2)
    if rank1:
        v_scale = (sv.row_max.reshape(-1), sv.col_max.reshape(-1, n))
    else:
        v_scale = flat(sv.absmax)
    ma = flat(sm.absmax)
    impl = fused_adam_4bit.implementation_for(g2, ma, m.book, v.book, implementation,
                                              interpret)  # fmt: skip
    if impl == "xla":
        return None
    u, mc, ma, vc, vs = fused_adam_4bit.adam_update(
        g2, flat(sm.codes), ma, flat(sv.codes), v_scale, hyper, m_map=m.book, v_map=v.book,
        n=n, sign_fix=m.sign_fix, implementation=impl, interpret=interpret,
    )  # fmt: skip
    u = bw.from_blocks(u.reshape(*lead, -1, bs), g.shape)
    new_m = cd.QuantizedMoment(mc.reshape(sm.codes.shape), ma.reshape(sm.absmax.shape))
    vc = vc.reshape(sv.codes.shape)
    if rank1:
        new_v = cd.Rank1Moment(vc, vs[0].reshape(sv.row_max.shape),
                               vs[1].reshape(sv.col_max.shape))  # fmt: skip
    else:
        new_v = cd.QuantizedMoment(vc, vs.reshape(sv.absmax.shape))
    return u, new_m, new_v


def _fused(hyper, implementation, interpret):
    """The engine's ``fused`` hook: the fused update kernel where it runs, else None.

    It takes parameters whose two moments are 8-bit map or E4M3 block codecs of one block
    size and scale dtype (:mod:`jaxq.kernels.fused_adam`), or ``adamw_4bit``'s 4-bit
    moments (:mod:`jaxq.kernels.fused_adam_4bit`), on a single device: a Pallas call is
    not partitioned across devices, so sharded training keeps the XLA path.
    """
    def fused(g, states, cs):
        m, v = cs
        if isinstance(m, cd.BlockCodec) and m.bits == 4:
            if not (interpret or jax.device_count() == 1):
                return None
            return _fused_4bit(g, states, cs, hyper, implementation, interpret)
        m_spec, v_spec = _kernel_spec(m, True), _kernel_spec(v, False)
        if (m_spec is None or v_spec is None or m.block_size != v.block_size
                or jnp.dtype(m.scale_dtype) != jnp.dtype(v.scale_dtype)
                or not (interpret or jax.device_count() == 1)):  # fmt: skip
            return None
        bs = m.block_size
        lead, _ = bw.row_shape(g.shape, bs)
        sm, sv = states
        g2 = bw.to_blocks(g, bs).reshape(-1, sm.codes.shape[-1])
        flat = lambda a: a.reshape(-1, a.shape[-1])  # noqa: E731
        args = (g2, _as_bits(flat(sm.codes)), flat(sm.absmax), _as_bits(flat(sv.codes)),
                flat(sv.absmax), hyper)  # fmt: skip
        impl = fused_adam.implementation_for(g2, args[2], m_spec, v_spec, implementation,
                                             interpret)  # fmt: skip
        if impl == "xla":
            return None
        u, mc, ma, vc, va = fused_adam.adam_update(
            *args, m_map=m_spec, v_map=v_spec, sign_fix=getattr(m, "sign_fix", False),
            implementation=impl, interpret=interpret,
        )  # fmt: skip
        u = bw.from_blocks(u.reshape(*lead, -1, bs), g.shape)

        def moment(codes, scale, like):
            codes = codes.reshape(like.codes.shape)
            if like.codes.dtype != jnp.uint8:
                codes = jax.lax.bitcast_convert_type(codes, like.codes.dtype)
            return cd.QuantizedMoment(codes, scale.reshape(like.absmax.shape))

        return u, moment(mc, ma, sm), moment(vc, va, sv)

    return fused


def _scale_by_adam(b1, b2, eps, codecs, *, keep_fp32, min_quantized_size,
                   implementation="xla", interpret=False):  # fmt: skip
    min_size = static_int(
        _DEFAULT_MIN_SIZE if min_quantized_size is None else min_quantized_size,
        "min_quantized_size",
        minimum=0,
    )

    def init_fn(params):
        mu, nu = init_moments(
            params, codecs, 2, keep_fp32=keep_fp32, min_quantized_size=min_size
        )
        return QuantizedAdamState(jnp.zeros([], jnp.int32), mu, nu)

    def update_fn(updates, state, params=None):
        del params
        count = optax.safe_increment(state.count)
        t = count.astype(jnp.float32)
        beta1 = jnp.asarray(b1, jnp.float32)
        beta2 = jnp.asarray(b2, jnp.float32)
        bc1 = 1.0 - beta1**t
        bc2_sqrt = jnp.sqrt(1.0 - beta2**t)
        epsilon = jnp.asarray(eps, jnp.float32)

        def step(g, moments):
            m, v = moments
            m = beta1 * m + (1.0 - beta1) * g
            v = beta2 * v + (1.0 - beta2) * (g * g)
            u = (m / bc1) / (jnp.sqrt(v) / bc2_sqrt + epsilon)
            return u, (m, v)

        fused = None if implementation == "xla" else _fused(
            fused_adam.hyperparameters(beta1, beta2, epsilon, count), implementation, interpret
        )  # fmt: skip
        updates, (mu, nu) = step_moments(updates, (state.mu, state.nu), codecs, step,
                                         fused=fused)  # fmt: skip
        return updates, QuantizedAdamState(count, mu, nu)

    return optax.GradientTransformation(init_fn, update_fn)


def _codecs_8bit(block_size, scale_dtype):
    bs = static_int(256 if block_size is None else block_size, "block_size", minimum=1)
    sd = scale_dtype_of(scale_dtype, jnp.bfloat16)
    m = cd.BlockCodec(maps.SIGNED8, bs, 8, sign_fix=True, scale_dtype=sd)
    v = cd.BlockCodec(maps.UNSIGNED8, bs, 8, scale_dtype=sd)
    return lambda shape: (m, v)


def _codecs_4bit(block_size, scale_dtype):
    bs = static_int(128 if block_size is None else block_size, "block_size", minimum=2)
    if bs % 2:
        raise ValueError(f"block_size: expected an even int for 4-bit codes, got {bs}")
    sd = scale_dtype_of(scale_dtype, jnp.float32)
    m = cd.BlockCodec(maps.SIGNED4, bs, 4, sign_fix=True, scale_dtype=sd)
    v1 = cd.BlockCodec(maps.LINEAR4, bs, 4, scale_dtype=sd)
    v2 = cd.Rank1Codec(maps.LINEAR4, bs)
    return lambda shape: (m, v2 if v2.applies_to(shape) else v1)


def _codecs_fp8(block_size, scale_dtype):
    bs = static_int(256 if block_size is None else block_size, "block_size", minimum=1)
    sd = scale_dtype_of(scale_dtype, jnp.bfloat16)
    m, v = cd.FP8Codec(bs, sd), cd.FP8Codec(bs, sd, keep_nonzero=True)
    return lambda shape: (m, v)


_KERNEL_ARGS = """        implementation: ``"xla"`` (default) or ``None`` / ``"pallas"`` for the
            fused update kernel (:mod:`jaxq.kernels.fused_adam`: one pass over the state
            per step) where it runs, an NVIDIA GPU and a single device, XLA elsewhere. It
            is opt-in until it has been measured on a GPU; the new state is the same.
        interpret: run that kernel in Pallas interpret mode (any platform; for tests).
"""

_KERNEL_ARGS_4BIT = """        implementation: ``"xla"`` (default), or ``None`` / ``"pallas"``
            for the fused update kernel (:mod:`jaxq.kernels.fused_adam_4bit`: one pass
            over the state per step, two for a rank-1 ``v``, whose row and column maxima
            come first) where it runs, an NVIDIA GPU and a single device, power-of-two
            blocks >= 32 and a matrix view that is the row layout; XLA elsewhere. It is
            opt-in until it has been measured on a GPU; the new state is the same, up to
            the ulp of a multiply-add a compiler contracts (see that module).
        interpret: run that kernel in Pallas interpret mode (any platform; for tests).
"""

_COMMON_ARGS = """
    Args:
        b1: decay of the first moment (float or array; injectable).
        b2: decay of the second moment.
        eps: added to the denominator ``sqrt(v_hat)``.
        block_size: elements per block along the rows (static; default {bs}; rows are the
            last axis, or the last axes merged when it is short).
        min_quantized_size: parameters with fewer elements keep float32 moments (static;
            default 4096).
        keep_fp32: predicate ``(path, param) -> bool`` on the ``"/"``-joined parameter
            path, or a pytree of bools like the parameters: True keeps float32 moments.
            StableEmbed tables (:func:`~jaxq.optim.is_stable_embedding`) keep them always.
        scale_dtype: dtype of the stored block scales, ``float32`` or ``bfloat16``
            (stored rounded up; default {sd}).
"""


def scale_by_adam_8bit(
    b1=0.9, b2=0.999, eps=1e-8, *, block_size=None, min_quantized_size=None,
    keep_fp32=None, scale_dtype=None, implementation="xla", interpret=False,
) -> optax.GradientTransformation:  # fmt: skip
    """Adam's scaling with 8-bit blockwise moments (bitsandbytes' dynamic maps).

    ``m`` uses the signed dynamic map, ``v`` the unsigned one (:func:`dynamic_map`), blocks
    of 256 along the last axis (rows) with per-block absmax. A nonzero ``m`` never flips sign on
    re-quantization. Block absmax is stored as bfloat16 rounded up by default (2 bytes
    per 256 values, 2.016 bytes/param); ``scale_dtype=jnp.float32`` stores bitsandbytes'
    exact float32 absmax (2.031 bytes/param). Drop-in for ``optax.scale_by_adam``.
    {args}{kernel}
    Returns:
        An ``optax.GradientTransformation`` with :class:`QuantizedAdamState`.

    Example:
        >>> import optax, jax.numpy as jnp
        >>> tx = optax.chain(scale_by_adam_8bit(), optax.scale(-1e-3))
        >>> params = {{"w": jnp.ones((64, 128))}}
        >>> state = tx.init(params)
        >>> upd, state = tx.update(params, state)
        >>> upd["w"].shape
        (64, 128)
    """
    return _scale_by_adam(
        b1, b2, eps, _codecs_8bit(block_size, scale_dtype),
        keep_fp32=keep_fp32, min_quantized_size=min_quantized_size,
        implementation=implementation, interpret=interpret,
    )  # fmt: skip


def scale_by_adam_4bit(
    b1=0.9, b2=0.999, eps=1e-8, *, block_size=None, min_quantized_size=None,
    keep_fp32=None, scale_dtype=None, implementation="xla", interpret=False,
) -> optax.GradientTransformation:  # fmt: skip
    """Adam's scaling with 4-bit moments (Li et al. 2023), two codes per byte.

    ``m``: blocks of 128 along the last axis (rows), 16-value signed dynamic map
    (:func:`dynamic_map_4bit`), no sign flips. ``v``: the linear map without zero
    ``{{1/16, ..., 1}}`` (:func:`linear_map_4bit`), normalized per element by
    ``min(row_max, col_max)`` (rank-1 normalization) of a matrix, or of the matrix view of
    a tensor with more axes (a batch of matrices over the leading axes when the last axis
    is long; a short last axis merged with the ones before it, ``(d, heads, 64)`` ->
    ``(d, heads * 64)``); by block absmax (blocks of 128) for vectors and tensors without
    such a view.
    {args}{kernel}
    Returns:
        An ``optax.GradientTransformation`` with :class:`QuantizedAdamState`.

    Example:
        >>> import optax, jax.numpy as jnp
        >>> tx = optax.chain(scale_by_adam_4bit(), optax.scale(-1e-3))
        >>> state = tx.init({{"w": jnp.ones((64, 128))}})
        >>> state[0].nu["w"].codes.shape
        (64, 64)
    """
    return _scale_by_adam(
        b1, b2, eps, _codecs_4bit(block_size, scale_dtype),
        keep_fp32=keep_fp32, min_quantized_size=min_quantized_size,
        implementation=implementation, interpret=interpret,
    )  # fmt: skip


def scale_by_adam_fp8(
    b1=0.9, b2=0.999, eps=1e-8, *, block_size=None, min_quantized_size=None,
    keep_fp32=None, scale_dtype=None, implementation="xla", interpret=False,
) -> optax.GradientTransformation:  # fmt: skip
    """Adam's scaling with both moments stored as blockwise E4M3.

    Blocks of 256 along the last axis (rows), ``scale = absmax / 448`` per block, values
    ``E4M3(x / scale)`` rounded to nearest even (float8_e4m3fn storage), except that a
    positive second moment that would round to 0 is stored as the smallest subnormal
    ``2**-9 * scale`` (see :class:`jaxq.optim.codecs.FP8Codec`): with E4M3's 18 binades
    per block, a flushed ``v`` beside a nonzero ``m`` would make the next update up to
    ``1 / sqrt(1 - b2)`` times too large.
    {args}{kernel}
    Returns:
        An ``optax.GradientTransformation`` with :class:`QuantizedAdamState`.

    Example:
        >>> import optax, jax.numpy as jnp
        >>> state = scale_by_adam_fp8().init({{"w": jnp.ones((64, 256))}})
        >>> state.mu["w"].codes.dtype
        dtype(float8_e4m3fn)
    """
    return _scale_by_adam(
        b1, b2, eps, _codecs_fp8(block_size, scale_dtype),
        keep_fp32=keep_fp32, min_quantized_size=min_quantized_size,
        implementation=implementation, interpret=interpret,
    )  # fmt: skip


scale_by_adam_8bit.__doc__ = scale_by_adam_8bit.__doc__.format(
    args=_COMMON_ARGS.format(bs=256, sd="bfloat16"), kernel=_KERNEL_ARGS)
scale_by_adam_4bit.__doc__ = scale_by_adam_4bit.__doc__.format(
    args=_COMMON_ARGS.format(bs=128, sd="float32"), kernel=_KERNEL_ARGS_4BIT)
scale_by_adam_fp8.__doc__ = scale_by_adam_fp8.__doc__.format(
    args=_COMMON_ARGS.format(bs=256, sd="bfloat16"), kernel=_KERNEL_ARGS)


def _adamw(scale_by, learning_rate, b1, b2, eps, weight_decay, mask, kw):
    parts = [scale_by(b1, b2, eps, **kw)]
    if weight_decay is not None:
        parts.append(optax.add_decayed_weights(weight_decay, mask))
    parts.append(optax.scale_by_learning_rate(learning_rate))
    return optax.chain(*parts)


def adam_8bit(
    learning_rate, b1=0.9, b2=0.999, eps=1e-8, *, block_size=None,
    min_quantized_size=None, keep_fp32=None, scale_dtype=None, implementation="xla",
    interpret=False,
) -> optax.GradientTransformation:  # fmt: skip
    """Adam with 8-bit moments: ``chain(scale_by_adam_8bit(...), scale_by_learning_rate)``.

    Args:
        learning_rate: float, array or optax schedule (``step -> lr``).
        b1, b2, eps, block_size, min_quantized_size, keep_fp32, scale_dtype,
            implementation, interpret: as :func:`scale_by_adam_8bit`.

    Example:
        >>> import jax.numpy as jnp
        >>> tx = adam_8bit(1e-3)
        >>> state = tx.init({"w": jnp.zeros((128, 64))})
    """
    kw = dict(block_size=block_size, min_quantized_size=min_quantized_size,
              keep_fp32=keep_fp32, scale_dtype=scale_dtype, implementation=implementation,
              interpret=interpret)  # fmt: skip
    return _adamw(scale_by_adam_8bit, learning_rate, b1, b2, eps, None, None, kw)


_ADAMW_DOC = """{title}

    ``optax.adamw`` semantics: ``chain(scale_by_adam_{kind}(b1, b2, eps, ...),
    add_decayed_weights(weight_decay, mask), scale_by_learning_rate(learning_rate))``.
    {detail}
    Args:
        learning_rate: float, array or optax schedule (``step -> lr``).
        b1: decay of the first moment.
        b2: decay of the second moment.
        eps: added to ``sqrt(v_hat)``.
        weight_decay: decoupled weight decay ``lambda``: the update gets ``-lr * lambda * p``.
        mask: pytree of bools or callable ``params -> pytree`` choosing which parameters
            decay (as ``optax.adamw``; with ``optax.inject_hyperparams`` pass
            ``static_args=('mask', 'keep_fp32')`` when these are callables).
        block_size, min_quantized_size, keep_fp32, scale_dtype: as
            :func:`scale_by_adam_{kind}`.

    Returns:
        An ``optax.GradientTransformation`` (state: a tuple of NamedTuples).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> params = {{"w": jnp.ones((256, 256)), "b": jnp.zeros((256,))}}
        >>> tx = adamw_{kind}(1e-3, weight_decay=0.1)
        >>> state = tx.init(params)
        >>> grads = jax.tree.map(jnp.ones_like, params)
        >>> updates, state = jax.jit(tx.update)(grads, state, params)
    """


def adamw_8bit(
    learning_rate, b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-2, mask=None, *,
    block_size=None, min_quantized_size=None, keep_fp32=None, scale_dtype=None,
    implementation="xla", interpret=False,
) -> optax.GradientTransformation:  # fmt: skip
    kw = dict(block_size=block_size, min_quantized_size=min_quantized_size,
              keep_fp32=keep_fp32, scale_dtype=scale_dtype, implementation=implementation,
              interpret=interpret)  # fmt: skip
    return _adamw(scale_by_adam_8bit, learning_rate, b1, b2, eps, weight_decay, mask, kw)


def adamw_4bit(
    learning_rate, b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-2, mask=None, *,
    block_size=None, min_quantized_size=None, keep_fp32=None, scale_dtype=None,
    implementation="xla", interpret=False,
) -> optax.GradientTransformation:  # fmt: skip
    kw = dict(block_size=block_size, min_quantized_size=min_quantized_size,
              keep_fp32=keep_fp32, scale_dtype=scale_dtype, implementation=implementation,
              interpret=interpret)  # fmt: skip
    return _adamw(scale_by_adam_4bit, learning_rate, b1, b2, eps, weight_decay, mask, kw)


def adamw_fp8(
    learning_rate, b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-2, mask=None, *,
    block_size=None, min_quantized_size=None, keep_fp32=None, scale_dtype=None,
    implementation="xla", interpret=False,
) -> optax.GradientTransformation:  # fmt: skip
    kw = dict(block_size=block_size, min_quantized_size=min_quantized_size,
              keep_fp32=keep_fp32, scale_dtype=scale_dtype, implementation=implementation,
              interpret=interpret)  # fmt: skip
    return _adamw(scale_by_adam_fp8, learning_rate, b1, b2, eps, weight_decay, mask, kw)


adamw_8bit.__doc__ = _ADAMW_DOC.format(
    title="AdamW with 8-bit blockwise moments (about 2 bytes of state per parameter).",
    kind="8bit", detail="Moments as in :func:`scale_by_adam_8bit`; ``implementation`` and "
    "``interpret`` (also accepted here) choose the fused update kernel.\n")
adamw_4bit.__doc__ = _ADAMW_DOC.format(
    title="AdamW with 4-bit moments (about 1 byte of state per parameter).",
    kind="4bit", detail="Moments as in :func:`scale_by_adam_4bit` (block 128); "
    "``implementation`` and ``interpret`` (also accepted here) choose the fused update "
    "kernel.\n")
adamw_fp8.__doc__ = _ADAMW_DOC.format(
    title="AdamW with blockwise E4M3 moments (about 2 bytes of state per parameter).",
    kind="fp8", detail="Moments as in :func:`scale_by_adam_fp8` (block 256); "
    "``implementation`` and ``interpret`` (also accepted here) choose the fused update "
    "kernel.\n")
