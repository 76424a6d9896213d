"""Reference models for jaxq's end-to-end runs (fidelity, demo, low-precision training).

* :class:`GPT` / :class:`GPTConfig`: a small decoder-only transformer in Flax NNX whose
  weight matmuls all go through a ``dot_general`` hook.
* :func:`train`, :func:`make_train_step`, :func:`evaluate`: functional training with any
  optax optimizer on jaxq's byte-level corpus.

Example:
    >>> import optax
    >>> from jaxq.models import GPTConfig, train
    >>> result = train(GPTConfig(d_model=32, n_heads=2, n_layers=1, seq_len=32),
    ...                optax.adamw(3e-3), steps=3, max_bytes=100_000)
    >>> result.losses.shape
    (3,)
"""

from jaxq.models.gpt import GPT, MLP, Block, CausalSelfAttention, GPTConfig, num_params
from jaxq.models.train import (
    TrainResult,
    cross_entropy,
    evaluate,
    make_train_step,
    mean_window_loss,
    merge_model,
    split_model,
    train,
)

__all__ = [
    "GPT",
    "GPTConfig",
    "Block",
    "CausalSelfAttention",
    "MLP",
    "num_params",
    "TrainResult",
    "cross_entropy",
    "evaluate",
    "make_train_step",
    "mean_window_loss",
    "merge_model",
    "split_model",
    "train",
]
