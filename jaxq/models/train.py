"""Functional training helpers for :class:`~jaxq.models.GPT` with any optax optimizer.

The model is split once into a static ``graphdef`` and a plain nested ``dict`` of
parameter arrays (``nnx.to_pure_dict``); the optimizer state is whatever pytree the
optax optimizer returns. Both are ordinary pytrees, so they can be measured
(``jaxq.optim.state_nbytes``), sharded and checkpointed with orbax, and the train step is
a pure jitted function that donates them:

.. math::

    \\mathcal{L}(\\theta) = -\\frac{1}{BT}\\sum_{b,t} \\log \\mathrm{softmax}
        (f_\\theta(x_{b,:t+1}))_{y_{b,t}} \\quad \\text{(nats per token)}

Example:
    >>> import optax
    >>> from jaxq.models import GPTConfig, train
    >>> config = GPTConfig(d_model=32, n_heads=2, n_layers=1, seq_len=32)
    >>> result = train(config, optax.adamw(3e-3), steps=5, seed=0,
    ...                corpus=None, max_bytes=200_000)
    >>> result.losses.shape
    (5,)
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxq import data
from jaxq.models.gpt import GPT, GPTConfig

__all__ = [
    "cross_entropy",
    "split_model",
    "merge_model",
    "make_train_step",
    "evaluate",
    "TrainResult",
    "train",
]

Params = dict[str, Any]
TrainStep = Callable[[Params, Any, jax.Array, jax.Array], tuple[Params, Any, jax.Array]]


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy in nats, computed in float32.

    Args:
        logits: ``(..., V)`` unnormalised scores.
        targets: Integer ids of shape ``logits.shape[:-1]``.

    Returns:
        Scalar :math:`-\\mathrm{mean}\\, \\log \\mathrm{softmax}(\\text{logits})_{\\text{target}}`.

    Raises:
        ValueError: If the shapes do not match.

    Example:
        >>> import jax.numpy as jnp
        >>> float(cross_entropy(jnp.zeros((2, 4)), jnp.array([0, 3])))  # log(4)
        1.3862943649291992
    """
    if logits.shape[:-1] != targets.shape:
        raise ValueError(
            f"targets must have shape logits.shape[:-1] = {logits.shape[:-1]}, "
            f"got {targets.shape}"
        )
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    return jnp.mean(losses)


def split_model(model: GPT) -> tuple[nnx.GraphDef, Params]:
    """Splits a model into its static ``graphdef`` and a pure ``dict`` of parameters.

    Example:
        >>> from flax import nnx
        >>> from jaxq.models import GPT, GPTConfig
        >>> graphdef, params = split_model(GPT(GPTConfig(d_model=32, n_heads=2),
        ...                                    rngs=nnx.Rngs(0)))
        >>> params["ln_f"]["scale"].shape
        (32,)
    """
    graphdef, state = nnx.split(model)
    return graphdef, nnx.to_pure_dict(state)


def merge_model(graphdef: nnx.GraphDef, params: Params) -> GPT:
    """Inverse of :func:`split_model`: a module whose parameters are ``params``."""
    return nnx.merge(graphdef, params)


def make_train_step(
    graphdef: nnx.GraphDef,
    optimizer: optax.GradientTransformation,
    *,
    donate: bool = True,
    compiler_options: dict[str, Any] | None = None,
) -> TrainStep:
    """A jitted step ``(params, opt_state, inputs, targets) -> (params, opt_state, loss)``.

    Computes the gradient of :func:`cross_entropy` of the model's logits with respect to
    ``params``, then ``updates, opt_state = optimizer.update(grads, opt_state, params)``
    and ``params + updates``. ``loss`` is the loss before the update.

    Args:
        graphdef: From :func:`split_model`.
        optimizer: Any ``optax.GradientTransformation`` (float or jaxq's quantized ones).
        donate: Donate ``params`` and ``opt_state`` buffers to the step (then the caller's
            inputs are invalidated after the call).
        compiler_options: XLA options for this step's compilation, as ``jax.jit`` takes
            them (for example ``{"xla_backend_optimization_level": 3}`` to override an
            ``XLA_FLAGS`` setting for this program only).

    Returns:
        The jitted step function.

    Example:
        >>> import jax, optax
        >>> from flax import nnx
        >>> from jaxq.models import GPT, GPTConfig
        >>> model = GPT(GPTConfig(d_model=32, n_heads=2, seq_len=8), rngs=nnx.Rngs(0))
        >>> graphdef, params = split_model(model)
        >>> opt = optax.adam(1e-3)
        >>> step = make_train_step(graphdef, opt)
        >>> x = jax.numpy.zeros((2, 8), jax.numpy.int32)
        >>> params, state, loss = step(params, opt.init(params), x, x)
    """
    if not isinstance(optimizer, optax.GradientTransformation):
        raise TypeError(
            f"optimizer must be an optax.GradientTransformation, got {type(optimizer).__name__}"
        )

    def loss_fn(params, inputs, targets):
        return cross_entropy(merge_model(graphdef, params)(inputs), targets)

    def step(params, opt_state, inputs, targets):
        loss, grads = jax.value_and_grad(loss_fn)(params, inputs, targets)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1) if donate else (),
                   compiler_options=compiler_options)  # fmt: skip


@functools.partial(jax.jit, static_argnums=0)
def _window_losses(graphdef, params, inputs, targets):
    logits = merge_model(graphdef, params)(inputs)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean(axis=-1)


def evaluate(
    model: GPT, tokens: np.ndarray | jax.Array, *, batch_size: int = 64,
    max_windows: int | None = None,
) -> float:
    """Mean validation cross-entropy (nats per token) of ``model`` on ``tokens``.

    ``tokens`` is cut into consecutive non-overlapping windows of ``seq_len + 1`` tokens
    (stride ``seq_len``; the incomplete tail is dropped); every position of every window is
    scored once with its full left context inside the window, and the mean over all scored
    tokens is returned. Deterministic: no sampling.

    Args:
        model: A :class:`GPT`.
        tokens: 1-D integer token ids, at least ``seq_len + 1`` of them.
        batch_size: Windows per forward pass (memory only; does not change the result
            beyond float32 summation order).
        max_windows: Use only the first ``max_windows`` windows (``None``: all).

    Returns:
        The mean cross-entropy as a Python float.

    Raises:
        ValueError: If ``tokens`` is not 1-D or too short, or a size is not positive.

    Example:
        >>> import numpy as np
        >>> from flax import nnx
        >>> from jaxq.models import GPT, GPTConfig
        >>> model = GPT(GPTConfig(d_model=32, n_heads=2, seq_len=8), rngs=nnx.Rngs(0))
        >>> loss = evaluate(model, np.arange(100) % 256)
        >>> bool(abs(loss - np.log(256)) < 0.2)  # near-uniform predictions at init
        True
    """
    graphdef, params = split_model(model)
    return mean_window_loss(
        functools.partial(_window_losses, graphdef, params), tokens, model.config.seq_len,
        batch_size=batch_size, max_windows=max_windows,
    )  # fmt: skip


def mean_window_loss(window_losses, tokens, seq_len: int, *, batch_size: int = 64,
                     max_windows: int | None = None) -> float:  # fmt: skip
    """Mean cross-entropy over consecutive held-out windows, by a per-window loss function.

    ``tokens`` is cut into ``n`` non-overlapping windows of ``seq_len + 1`` tokens (stride
    ``seq_len``; at most ``max_windows``); ``window_losses(inputs, targets)`` maps a batch of
    ``batch_size`` windows (``[batch_size, seq_len]`` int32 each) to their per-window mean
    losses, and the result is

    .. math:: \\frac{1}{n} \\sum_{w=1}^{n} \\ell_w .

    Every batch has the same shape (the last one is padded and its padding dropped), so a
    jitted or ahead-of-time compiled ``window_losses`` compiles once. :func:`evaluate` and
    the demo's evaluations use it.

    Example:
        >>> import numpy as np
        >>> per_window = lambda x, y: np.asarray(y, np.float32).mean(axis=-1)
        >>> mean_window_loss(per_window, np.arange(9), 4, batch_size=8)  # windows 0..4, 4..8
        4.5
    """
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"tokens must be 1-D, got shape {tokens.shape}")
    if batch_size <= 0 or (max_windows is not None and max_windows <= 0):
        raise ValueError(
            f"batch_size and max_windows must be positive, got {batch_size}, {max_windows}"
        )
    n = (tokens.shape[0] - 1) // seq_len
    if n < 1:
        raise ValueError(
            f"tokens has length {tokens.shape[0]}, need at least seq_len + 1 = {seq_len + 1}"
        )
    if max_windows is not None:
        n = min(n, max_windows)
    idx = np.arange(n)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
    windows = tokens[idx].astype(np.int32)
    total = 0.0
    for i in range(0, n, batch_size):
        chunk = windows[i:i + batch_size]
        pad = batch_size - chunk.shape[0]
        if pad:  # keep one compiled shape; padded rows are ignored below
            chunk = np.concatenate([chunk, np.zeros((pad, seq_len + 1), np.int32)])
        losses = window_losses(chunk[:, :-1], chunk[:, 1:])
        total += float(jnp.sum(losses[: batch_size - pad], dtype=jnp.float32))
    return total / n


class TrainResult(NamedTuple):
    """What :func:`train` returns.

    Attributes:
        losses: float32 array of shape ``(steps,)``: training loss (nats/token) per step.
        val_loss: Final mean validation cross-entropy (:func:`evaluate`).
        graphdef: The model's static structure.
        params: Final parameters (pure dict).
        opt_state: Final optimizer state.
        recipe_state: With a ``recipe``: the per-projection recipe state (``None`` without).
        steps: With a ``learned_step`` recipe: the learned step sizes.
    """

    losses: np.ndarray
    val_loss: float
    graphdef: nnx.GraphDef
    params: Params
    opt_state: Any
    recipe_state: Any = None
    steps: Any = None

    @property
    def model(self) -> GPT:
        """The trained model (``merge_model(graphdef, params)``)."""
        return merge_model(self.graphdef, self.params)


def _load_corpus(corpus, max_bytes: int) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(corpus, tuple):
        if len(corpus) != 2:
            raise ValueError(f"corpus as a tuple must be (train, val), got {len(corpus)} items")
        return np.asarray(corpus[0], np.int32), np.asarray(corpus[1], np.int32)
    if corpus is None or isinstance(corpus, str | Path):
        tokens = data.load_tokens(corpus, max_bytes=max_bytes)
    else:
        tokens = np.asarray(corpus)
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(
            f"corpus tokens must be a 1-D integer array, got shape {tokens.shape} "
            f"and dtype {tokens.dtype}"
        )
    return data.split(tokens.astype(np.int32))


def train(
    config: GPTConfig,
    optimizer: optax.GradientTransformation,
    *,
    steps: int,
    seed: int = 0,
    corpus: Any = None,
    batch_size: int = 16,
    max_bytes: int = 1_000_000,
    eval_windows: int | None = 256,
    recipe=None,
    compiler_options: dict[str, Any] | None = None,
) -> TrainResult:
    """Trains ``GPT(config)`` from scratch and reports the loss curve and validation loss.

    Runs with the same ``seed`` (and corpus, config, sizes) start from identical
    parameters and see identical batches, so they differ only by the optimizer: this is
    the protocol of jaxq's fidelity comparisons. The ``seed`` key is split into a model
    initialisation key and a data key; batch ``i`` is drawn with ``fold_in(data_key, i)``
    by :func:`jaxq.data.batch` from the training split.

    Non-finite losses are recorded as they are (the run is not stopped), so a diverging
    optimizer shows up as ``nan`` in ``losses`` and ``val_loss``.

    Args:
        config: Model hyperparameters.
        optimizer: Any optax ``GradientTransformation``.
        steps: Number of optimizer steps (positive).
        seed: Integer seed for initialisation and batch sampling.
        corpus: ``None`` (the standard-library corpus from :mod:`jaxq.data`), a path to a
            text file, a 1-D array of token ids (split 90/10 by :func:`jaxq.data.split`) or
            a ``(train_tokens, val_tokens)`` tuple.
        batch_size: Sequences per step; each has ``config.seq_len`` tokens.
        max_bytes: Bytes read when ``corpus`` is ``None`` or a path.
        eval_windows: Validation windows scored by :func:`evaluate` (``None``: all).
        recipe: A :class:`jaxq.ops.Recipe` for every hidden projection (see
            :mod:`jaxq.models.lowp`); the validation loss is then that of the quantized
            forward. ``None`` trains in the parameters' precision.
        compiler_options: XLA options for the training step's compilation (see
            :func:`make_train_step`).

    Returns:
        A :class:`TrainResult`.

    Raises:
        ValueError: If ``steps`` or ``batch_size`` is not positive or the corpus is unusable.

    Example:
        >>> import optax
        >>> r = train(GPTConfig(d_model=32, n_heads=2, n_layers=1, seq_len=32),
        ...           optax.adamw(3e-3), steps=3, max_bytes=100_000)
        >>> bool(r.val_loss > 0)
        True
    """
    if steps <= 0 or batch_size <= 0:
        raise ValueError(f"steps and batch_size must be positive, got {steps}, {batch_size}")
    train_tokens, val_tokens = _load_corpus(corpus, max_bytes)
    init_key, data_key = jax.random.split(jax.random.key(seed))
    model = GPT(config, rngs=nnx.Rngs(params=init_key))
    sample = jax.jit(
        functools.partial(data.batch, batch_size=batch_size, seq_len=config.seq_len)
    )
    train_tokens = jnp.asarray(train_tokens)
    if recipe is not None:
        return _train_quantized(model, optimizer, recipe, steps, sample, train_tokens,
                                val_tokens, data_key, eval_windows,
                                compiler_options)  # fmt: skip
    graphdef, params = split_model(model)
    opt_state = optimizer.init(params)
    step_fn = make_train_step(graphdef, optimizer, compiler_options=compiler_options)
    losses = []
    for i in range(steps):
        inputs, targets = sample(train_tokens, jax.random.fold_in(data_key, i))
        params, opt_state, loss = step_fn(params, opt_state, inputs, targets)
        losses.append(loss)
    losses = np.asarray(jax.device_get(jnp.stack(losses)), dtype=np.float32)
    val_loss = evaluate(merge_model(graphdef, params), val_tokens, max_windows=eval_windows)
    return TrainResult(losses, val_loss, graphdef, params, opt_state)


def _train_quantized(model, optimizer, recipe, steps, sample, train_tokens, val_tokens,
                     data_key, eval_windows, compiler_options) -> TrainResult:  # fmt: skip
    from jaxq.models import lowp

    first, _ = sample(train_tokens, jax.random.fold_in(data_key, 0))
    state, step_sizes = lowp.init_recipe_state(
        model, recipe, jax.random.fold_in(data_key, 2**31 - 1), sample_inputs=first
    )
    graphdef, params = split_model(model)
    trainable = {"params": params, "steps": step_sizes}
    opt_state = optimizer.init(trainable)
    step_fn = lowp.make_quantized_train_step(graphdef, optimizer, recipe,
                                             compiler_options=compiler_options)
    losses = []
    for i in range(steps):
        inputs, targets = sample(train_tokens, jax.random.fold_in(data_key, i))
        trainable, opt_state, state, loss = step_fn(trainable, opt_state, state, inputs, targets)
        losses.append(loss)
    losses = np.asarray(jax.device_get(jnp.stack(losses)), dtype=np.float32)
    window_losses = lowp.quantized_window_losses(
        graphdef, trainable["params"], recipe, state, trainable["steps"]
    )
    val_loss = mean_window_loss(window_losses, val_tokens, model.config.seq_len,
                                max_windows=eval_windows)  # fmt: skip
    return TrainResult(losses, val_loss, graphdef, trainable["params"], opt_state, state,
                       trainable["steps"])  # fmt: skip
