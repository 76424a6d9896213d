"""A small decoder-only transformer language model (GPT) in Flax NNX.

The model is the reference workload for jaxq's end-to-end runs: optimizer-state fidelity,
the ``jaxq demo`` command and low-precision training. It is deliberately plain:

.. math::

    h_0 = E[x] + P[0..T), \\quad
    h_{l+1}' = h_l + \\mathrm{Attn}(\\mathrm{LN}(h_l)), \\quad
    h_{l+1} = h_{l+1}' + \\mathrm{MLP}(\\mathrm{LN}(h_{l+1}')), \\quad
    \\mathrm{logits} = \\mathrm{LN}(h_L) W_{out}

with causal multi-head softmax attention, a GELU MLP of width ``d_ff`` and a readout that
is either tied to the token embedding (:math:`W_{out} = E^T`) or a separate
``nnx.Linear``.

Every weight matmul goes through a ``dot_general`` with :func:`jax.lax.dot_general`'s
signature: the projections are ``nnx.Linear`` layers built with the ``dot_general``
passed to :class:`GPT` (their ``dot_general`` attribute can also be replaced on a built
model), and the tied readout calls the same function. The two activation-by-activation
products inside attention (scores and the weighted sum of values) are plain einsums.

Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from jaxq.models import GPT, GPTConfig
    >>> config = GPTConfig(d_model=32, n_heads=2, n_layers=1, seq_len=16)
    >>> model = GPT(config, rngs=nnx.Rngs(0))
    >>> model(jnp.zeros((2, 16), jnp.int32)).shape
    (2, 16, 256)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = ["GPTConfig", "GPT", "CausalSelfAttention", "MLP", "Block", "num_params"]

DotGeneral = Callable[..., jax.Array]


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class GPTConfig:
    """Hyperparameters of :class:`GPT` (a frozen, hashable dataclass).

    Attributes:
        vocab_size: Number of token ids; 256 for jaxq's byte-level corpus.
        d_model: Width of the residual stream. Must be divisible by ``n_heads``.
        n_heads: Number of attention heads; each has ``d_model // n_heads`` dimensions.
        n_layers: Number of transformer blocks.
        seq_len: Maximum sequence length (size of the learned position embedding).
        d_ff: Hidden width of the MLP; ``None`` means ``4 * d_model``.
        tie_embeddings: When True the readout is :math:`h E^T` with the token embedding
            :math:`E`; otherwise a separate bias-free ``nnx.Linear(d_model, vocab_size)``.
        use_bias: Whether the projections carry biases.
        layer_norm_epsilon: The :math:`\\epsilon` of every LayerNorm.
        init_std: Standard deviation of the normal initialisation of embeddings and
            projections; the residual-output projections use
            ``init_std / sqrt(2 * n_layers)`` (GPT-2's scheme).
        dtype: Computation dtype of the layers (``None``: the parameters' dtype). Logits
            and the softmax are always computed in float32.
        param_dtype: Dtype of the parameters.

    Example:
        >>> GPTConfig(d_model=64, n_heads=4, n_layers=2, seq_len=64).head_dim
        16
    """

    vocab_size: int = 256
    d_model: int = 128
    n_heads: int = 4
    n_layers: int = 2
    seq_len: int = 128
    d_ff: int | None = None
    tie_embeddings: bool = True
    use_bias: bool = True
    layer_norm_epsilon: float = 1e-5
    init_std: float = 0.02
    dtype: Any = None
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_heads", "n_layers", "seq_len"):
            _check_positive_int(name, getattr(self, name))
        if self.d_ff is not None:
            _check_positive_int("d_ff", self.d_ff)
        if self.d_model % self.n_heads:
            raise ValueError(
                f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})"
            )
        if not (self.layer_norm_epsilon > 0 and self.init_std > 0):
            raise ValueError(
                "layer_norm_epsilon and init_std must be positive, got "
                f"{self.layer_norm_epsilon} and {self.init_std}"
            )

    @property
    def head_dim(self) -> int:
        """``d_model // n_heads``."""
        return self.d_model // self.n_heads

    @property
    def hidden_dim(self) -> int:
        """The MLP width: ``d_ff``, or ``4 * d_model`` when ``d_ff`` is None."""
        return self.d_ff if self.d_ff is not None else 4 * self.d_model


def num_params(config: GPTConfig) -> int:
    """Number of scalar parameters of ``GPT(config)``, computed from the config alone.

    Per block: :math:`4d^2 + 2 d f` weights, plus :math:`4d + f + d` biases when
    ``use_bias``, plus :math:`4d` LayerNorm scales and biases; then the embeddings
    :math:`(V + T) d`, the final LayerNorm :math:`2d` and, untied, the readout :math:`dV`.

    Example:
        >>> num_params(GPTConfig(d_model=64, n_heads=4, n_layers=2, seq_len=64))
        120576
    """
    d, f, v, t = config.d_model, config.hidden_dim, config.vocab_size, config.seq_len
    block = 4 * d * d + 2 * d * f + 4 * d
    if config.use_bias:
        block += 4 * d + f + d
    total = config.n_layers * block + (v + t) * d + 2 * d
    if not config.tie_embeddings:
        total += d * v
    return total


def _linear(
    d_in: int, d_out: int, config: GPTConfig, *, std: float, dot_general: DotGeneral,
    use_bias: bool, rngs: nnx.Rngs,
) -> nnx.Linear:
    return nnx.Linear(
        d_in, d_out, use_bias=use_bias, dtype=config.dtype, param_dtype=config.param_dtype,
        kernel_init=nnx.initializers.normal(std), dot_general=dot_general, rngs=rngs,
    )


def _layer_norm(config: GPTConfig, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(
        config.d_model, epsilon=config.layer_norm_epsilon, dtype=config.dtype,
        param_dtype=config.param_dtype, rngs=rngs,
    )


class CausalSelfAttention(nnx.Module):
    """Multi-head causal softmax self-attention with a fused QKV projection.

    .. math::

        [Q, K, V] = x W_{qkv}, \\quad
        A_h = \\mathrm{softmax}\\big(Q_h K_h^T / \\sqrt{d_h} + M\\big) V_h, \\quad
        y = [A_1 \\dots A_H] W_o,

    where :math:`M_{ij} = 0` for :math:`j \\le i` and a large negative number otherwise,
    so position :math:`i` never sees a later position. Scores and softmax run in float32.

    Args:
        config: The model's :class:`GPTConfig`.
        dot_general: Used by both projections (``qkv`` and ``out``).
        rngs: Parameter initialisation keys.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> attn = CausalSelfAttention(GPTConfig(d_model=32, n_heads=2), rngs=nnx.Rngs(0))
        >>> attn(jnp.ones((1, 5, 32))).shape
        (1, 5, 32)
    """

    def __init__(
        self, config: GPTConfig, *, dot_general: DotGeneral = jax.lax.dot_general,
        rngs: nnx.Rngs,
    ):
        d = config.d_model
        self.n_heads = config.n_heads
        self.head_dim = config.head_dim
        self.qkv = _linear(d, 3 * d, config, std=config.init_std, dot_general=dot_general,
                           use_bias=config.use_bias, rngs=rngs)
        self.out = _linear(d, d, config, std=config.init_std / math.sqrt(2 * config.n_layers),
                           dot_general=dot_general, use_bias=config.use_bias, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, d = x.shape
        qkv = self.qkv(x).reshape(b, t, 3, self.n_heads, self.head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
        scores = scores.astype(jnp.float32) / math.sqrt(self.head_dim)
        causal = jnp.tril(jnp.ones((t, t), dtype=bool))
        scores = jnp.where(causal, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        y = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, t, d)
        return self.out(y)


class MLP(nnx.Module):
    """Position-wise feed-forward network :math:`y = \\mathrm{GELU}(x W_1 + b_1) W_2 + b_2`.

    GELU is the tanh approximation (``jax.nn.gelu(approximate=True)``).

    Args:
        config: The model's :class:`GPTConfig` (widths ``d_model -> hidden_dim -> d_model``).
        dot_general: Used by both projections (``up`` and ``down``).
        rngs: Parameter initialisation keys.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> MLP(GPTConfig(d_model=32, n_heads=2), rngs=nnx.Rngs(0))(jnp.ones((3, 32))).shape
        (3, 32)
    """

    def __init__(
        self, config: GPTConfig, *, dot_general: DotGeneral = jax.lax.dot_general,
        rngs: nnx.Rngs,
    ):
        d, f = config.d_model, config.hidden_dim
        self.up = _linear(d, f, config, std=config.init_std, dot_general=dot_general,
                          use_bias=config.use_bias, rngs=rngs)
        self.down = _linear(f, d, config, std=config.init_std / math.sqrt(2 * config.n_layers),
                            dot_general=dot_general, use_bias=config.use_bias, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down(jax.nn.gelu(self.up(x), approximate=True))


class Block(nnx.Module):
    """Pre-LayerNorm transformer block: ``x + attn(ln1(x))`` then ``x + mlp(ln2(x))``.

    Args:
        config: The model's :class:`GPTConfig`.
        dot_general: Passed to the attention and MLP projections.
        rngs: Parameter initialisation keys.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> Block(GPTConfig(d_model=32, n_heads=2), rngs=nnx.Rngs(0))(jnp.ones((1, 4, 32))).shape
        (1, 4, 32)
    """

    def __init__(
        self, config: GPTConfig, *, dot_general: DotGeneral = jax.lax.dot_general,
        rngs: nnx.Rngs,
    ):
        self.ln1 = _layer_norm(config, rngs)
        self.attn = CausalSelfAttention(config, dot_general=dot_general, rngs=rngs)
        self.ln2 = _layer_norm(config, rngs)
        self.mlp = MLP(config, dot_general=dot_general, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nnx.Module):
    """Decoder-only transformer language model (token ids -> next-token logits).

    Parameters (``nnx.Param``): ``embed.embedding`` (V, d), ``pos_embed.embedding`` (T, d),
    ``blocks[i].{ln1, attn.qkv, attn.out, ln2, mlp.up, mlp.down}``, ``ln_f`` and, when
    ``config.tie_embeddings`` is False, ``readout.kernel`` (d, V). There is no dropout and no
    other state, so ``nnx.split(model)`` yields only parameters.

    Args:
        config: A :class:`GPTConfig`.
        dot_general: A function with :func:`jax.lax.dot_general`'s signature used for every
            weight matmul (all ``nnx.Linear`` layers and the tied readout). This is the hook
            through which quantized matmuls are injected; the default is exact float math.
        rngs: Parameter initialisation keys (``nnx.Rngs``).

    Raises:
        TypeError: If ``config`` is not a :class:`GPTConfig`.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> model = GPT(GPTConfig(d_model=32, n_heads=2, n_layers=1, seq_len=8),
        ...             rngs=nnx.Rngs(0))
        >>> model(jnp.array([[1, 2, 3]])).shape
        (1, 3, 256)
    """

    def __init__(
        self, config: GPTConfig, *, dot_general: DotGeneral = jax.lax.dot_general,
        rngs: nnx.Rngs,
    ):
        if not isinstance(config, GPTConfig):
            raise TypeError(f"config must be a GPTConfig, got {type(config).__name__}")
        self.config = config
        self.dot_general = dot_general
        init = nnx.initializers.normal(config.init_std)
        self.embed = nnx.Embed(config.vocab_size, config.d_model, embedding_init=init,
                               dtype=config.dtype, param_dtype=config.param_dtype, rngs=rngs)
        self.pos_embed = nnx.Embed(config.seq_len, config.d_model, embedding_init=init,
                                   dtype=config.dtype, param_dtype=config.param_dtype,
                                   rngs=rngs)
        self.blocks = nnx.List(
            [Block(config, dot_general=dot_general, rngs=rngs) for _ in range(config.n_layers)]
        )
        self.ln_f = _layer_norm(config, rngs)
        if config.tie_embeddings:
            self.readout = None
        else:
            self.readout = _linear(config.d_model, config.vocab_size, config,
                                   std=config.init_std, dot_general=dot_general,
                                   use_bias=False, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """Next-token logits.

        Args:
            tokens: Integer token ids of shape ``(batch, T)`` (or ``(T,)``) with
                ``T <= config.seq_len`` and values in ``[0, vocab_size)``.

        Returns:
            float32 logits of shape ``tokens.shape + (vocab_size,)``; position ``t``
            depends only on ``tokens[..., :t + 1]``.

        Raises:
            TypeError: If ``tokens`` is not an integer array.
            ValueError: If ``tokens`` is not 1-D or 2-D or is longer than ``seq_len``.
        """
        tokens = jnp.asarray(tokens)
        if not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise TypeError(f"tokens must be integer token ids, got dtype {tokens.dtype}")
        if tokens.ndim not in (1, 2):
            raise ValueError(f"tokens must have shape (batch, T) or (T,), got {tokens.shape}")
        if tokens.shape[-1] > self.config.seq_len:
            raise ValueError(
                f"tokens has length {tokens.shape[-1]} (shape {tokens.shape}), more than "
                f"seq_len={self.config.seq_len}"
            )
        if tokens.ndim == 1:
            return self(tokens[None])[0]
        t = tokens.shape[1]
        x = self.embed(tokens) + self.pos_embed(jnp.arange(t))[None]
        for block in self.blocks:
            x = block(x)
        return self.logits(x)

    def logits(self, x: jax.Array) -> jax.Array:
        """Final LayerNorm and readout of the residual stream ``x``, as float32 logits."""
        x = self.ln_f(x)
        if self.readout is not None:
            logits = self.readout(x)
        else:
            table = self.embed.embedding[...]
            if self.config.dtype is not None:
                x, table = x.astype(self.config.dtype), table.astype(self.config.dtype)
            logits = self.dot_general(x, table, (((x.ndim - 1,), (1,)), ((), ())))
        return logits.astype(jnp.float32)
