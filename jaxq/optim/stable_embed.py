"""``StableEmbed``: the stable embedding layer of '8-bit Optimizers via Block-wise Quantization'.

An embedding table initialized Xavier-uniform, followed by a LayerNorm computed in
float32. Its table is stored under the attribute name ``stable_embedding``, which the
quantized optimizers' default ``keep_fp32`` predicate recognises, so the table keeps
32-bit optimizer state (the paper's recipe for stable training with 8-bit states).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxq.optim.common import STABLE_EMBEDDING_NAME

__all__ = ["StableEmbed"]


class StableEmbed(nnx.Module):
    """Embedding + float32 LayerNorm, Xavier-uniform table with 32-bit optimizer state.

    ``y = LayerNorm(E[ids])`` with ``E`` of shape ``(num_embeddings, features)`` drawn from
    ``U(-a, a)``, ``a = sqrt(6 / (num_embeddings + features))``; the LayerNorm (epsilon
    1e-5, learned scale and bias) runs in float32 whatever ``dtype`` is, and the result is
    cast to ``dtype`` (default: the table's dtype).

    Args:
        num_embeddings: vocabulary size.
        features: embedding width.
        dtype: output dtype (None: the parameter dtype).
        param_dtype: dtype of the table and LayerNorm parameters.
        rngs: ``nnx.Rngs`` providing a ``params`` key.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> from jaxq import optim
        >>> emb = StableEmbed(100, 16, rngs=nnx.Rngs(0))
        >>> emb(jnp.array([[1, 2, 3]])).shape
        (1, 3, 16)
        >>> params = nnx.state(emb, nnx.Param)
        >>> state = optim.adamw_8bit(1e-3, min_quantized_size=0).init(params)
        >>> state[0].mu["stable_embedding"].dtype   # float32 moments, not quantized
        dtype('float32')
    """

    def __init__(
        self,
        num_embeddings: int,
        features: int,
        *,
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        for name, v in (("num_embeddings", num_embeddings), ("features", features)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected a positive int, got {v!r}")
        init = jax.nn.initializers.xavier_uniform()
        table = init(rngs.params(), (num_embeddings, features), param_dtype)
        setattr(self, STABLE_EMBEDDING_NAME, nnx.Param(table))
        self.norm = nnx.LayerNorm(
            features, epsilon=1e-5, dtype=jnp.float32, param_dtype=param_dtype, rngs=rngs
        )
        self.num_embeddings = num_embeddings
        self.features = features
        self.dtype = dtype

    @property
    def table(self) -> jax.Array:
        """The ``(num_embeddings, features)`` embedding table."""
        return getattr(self, STABLE_EMBEDDING_NAME)[...]

    def __call__(self, ids: jax.Array) -> jax.Array:
        """Embeds integer ``ids`` of any shape -> ``ids.shape + (features,)``."""
        ids = jnp.asarray(ids)
        if not jnp.issubdtype(ids.dtype, jnp.integer):
            raise TypeError(f"ids: expected an integer array, got dtype {ids.dtype}")
        table = self.table
        x = jnp.take(table, ids, axis=0)
        y = self.norm(x.astype(jnp.float32))
        return y.astype(self.dtype or table.dtype)

    def attend(self, query: jax.Array) -> jax.Array:
        """Logits against the table: ``query @ E.T`` (for tied output layers)."""
        return jnp.dot(query, self.table.T.astype(query.dtype))
