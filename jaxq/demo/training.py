"""The training half of ``jaxq demo``: one model, one data stream, every precision.

Each run trains :class:`jaxq.models.GPT` from the same initialisation on the same batches
(:mod:`jaxq.data`, batch ``i`` drawn with ``fold_in(data_key, i)``) with AdamW, warm-up
and cosine decay; what differs is how the hidden projections compute. Quantized runs go
through :func:`jaxq.quantize_model` with one rule, ``blocks/.*`` (every projection of the
transformer blocks; embeddings, LayerNorms, attention's activation products and the tied
readout stay in float32), and the train step is the documented one:

.. math::

    (\\ell, g) = \\nabla_\\theta \\mathcal{L}(\\theta; s), \\quad
    s \\leftarrow \\mathrm{update}(s, \\text{observed amaxes}), \\quad
    \\theta \\leftarrow \\theta + \\mathrm{AdamW}(g)

(:func:`jaxq.wrapping.value_and_grad`). The unit-scaled run is a different model, the u-μP
decoder of :mod:`jaxq.unit_scaling` with static-scale FP8 matmuls and its own optimizer.

Example:
    >>> from jaxq.demo.training import RUNS, Preset, train_run
    >>> preset = Preset(d_model=32, n_heads=2, n_layers=1, seq_len=32, batch_size=4,
    ...                 steps=3, eval_windows=4, corpus_bytes=50_000)
    >>> result = train_run(RUNS["fp8_delayed"], preset, seed=0)
    >>> result.losses.shape, result.val_loss > 0
    ((3,), True)
"""

from __future__ import annotations

import dataclasses
import functools
import threading
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxq import data, optim, recipes
from jaxq.models.gpt import GPT, GPTConfig
from jaxq.models.train import cross_entropy, mean_window_loss

__all__ = ["Preset", "PRESETS", "RunSpec", "RUNS", "RunResult", "train_run", "window_losses"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Preset:
    """Sizes of a demo: the model, the run length and the evaluation.

    Attributes:
        d_model, n_heads, n_layers, seq_len: the GPT (and the unit-scaled decoder's width,
            heads and depth).
        batch_size: sequences per step.
        steps: optimizer steps per run.
        learning_rate: peak AdamW learning rate (warm-up over the first 10% of the steps,
            then cosine decay to a tenth).
        eval_windows: held-out windows of ``seq_len`` tokens scored at the end.
        corpus_bytes: bytes of the default corpus read (the last 10% are held out).
        calibration_batches: batches of 8 sequences for post-training quantization.
    """

    d_model: int = 128
    n_heads: int = 4
    n_layers: int = 2
    seq_len: int = 64
    batch_size: int = 8
    steps: int = 150
    learning_rate: float = 3e-3
    eval_windows: int = 128
    corpus_bytes: int = 1_000_000
    calibration_batches: int = 4

    @property
    def group(self) -> int:
        """Block size of the 128-element block recipes (INT4 g128, FP8 blockwise, W4 g128),
        smaller for models narrower than 128."""
        return min(128, self.d_model)

    def gpt_config(self, dtype=None) -> GPTConfig:
        return GPTConfig(d_model=self.d_model, n_heads=self.n_heads, n_layers=self.n_layers,
                         seq_len=self.seq_len, dtype=dtype)  # fmt: skip


PRESETS: dict[str, Preset] = {
    # A five-minute demo on a 2-core CPU (163 s measured without a compilation cache).
    "default": Preset(),
    # The longer comparison: the default model trained ten times longer, scored on four
    # times the held-out windows (570 s on a 2-core CPU with a warm compilation cache).
    "full": Preset(steps=1500, eval_windows=512, calibration_batches=16),
    # The default on a GPU: bigger and longer at the same wall time.
    "gpu": Preset(d_model=512, n_heads=8, n_layers=6, seq_len=128, batch_size=32, steps=2000,
                  learning_rate=6e-4, eval_windows=512, corpus_bytes=4_000_000,
                  calibration_batches=16),
}


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One training run of the demo.

    Attributes:
        name: the command-line name (``--recipes``).
        label: the row's name in the table (``{g}``: the preset's block size).
        recipe: ``recipe(preset)`` makes the :class:`jaxq.ops.Recipe` for the block
            projections (``None``: float).
        compute_dtype: the GPT's computation dtype (parameters stay float32).
        optimizer: ``"adamw"`` (optax), ``"adamw_8bit"`` (:mod:`jaxq.optim`) or ``"umup"``.
        model: ``"gpt"`` or ``"unit_scaled"`` (the u-μP decoder with static FP8).
    """

    name: str
    label: str
    recipe: Callable[[], Any] | None = None
    compute_dtype: Any = None
    optimizer: str = "adamw"
    model: str = "gpt"


RUNS: dict[str, RunSpec] = {
    r.name: r
    for r in (
        RunSpec("float32", "float32"),
        RunSpec("bf16", "bf16 compute", compute_dtype=jnp.bfloat16),
        RunSpec("fp8_current", "FP8 current scaling", lambda p: recipes.FP8Current()),
        RunSpec("fp8_delayed", "FP8 delayed scaling", lambda p: recipes.FP8Delayed()),
        RunSpec("fp8_blockwise", "FP8 blockwise (1x{g} / {g}x{g})",
                lambda p: recipes.FP8Blockwise(block_size=p.group)),
        RunSpec("mxfp8", "MXFP8", lambda p: recipes.MXFP8()),
        RunSpec("nvfp4", "NVFP4 (Hadamard + stoch. rounding)", lambda p: recipes.NVFP4()),
        RunSpec("int8", "INT8 QAT", lambda p: recipes.Int8()),
        RunSpec("int4", "INT4 g{g} QAT, learned steps",
                lambda p: recipes.Int4(block_size=p.group, learned_step=True)),
        RunSpec("unit_fp8", "unit-scaled (u-μP) decoder, static FP8", model="unit_scaled"),
        RunSpec("adamw_8bit", "float32, 8-bit AdamW states", optimizer="adamw_8bit"),
    )
}


class RunResult:
    """What one training run produced.

    Attributes:
        spec: the :class:`RunSpec`.
        label: the row's name.
        losses: training loss (nats/token) per step.
        val_loss: mean held-out loss (nats/token) of the final model (quantized forward).
        step_seconds: the fastest train step's wall time after compilation (the minimum
            is the statistic least disturbed by other work on the machine).
        weight_bytes: bytes of the trained parameters (float32 master weights, learned
            steps included).
        optimizer_bytes: bytes of the optimizer state.
        model: the trained NNX model (wrapped for quantized runs).
        seconds: wall time of the whole run, compilation and evaluation included.
    """

    def __init__(self, spec, label, losses, val_loss, step_seconds, weight_bytes,
                 optimizer_bytes, model, seconds):  # fmt: skip
        self.spec, self.label, self.losses, self.val_loss = spec, label, losses, val_loss
        self.step_seconds, self.weight_bytes = step_seconds, weight_bytes
        self.optimizer_bytes, self.model, self.seconds = optimizer_bytes, model, seconds


def _decay_mask(params):
    """Weight decay on matrices only (not on biases, norms or learned step sizes)."""

    def keep(path, x):
        return x.ndim >= 2 and not any("jaxq" in str(getattr(p, "key", p)) for p in path)

    return jax.tree_util.tree_map_with_path(keep, params)


def _schedule(preset: Preset):
    warmup = max(1, preset.steps // 10)
    return optax.warmup_cosine_decay_schedule(
        0.0, preset.learning_rate, warmup, max(preset.steps, warmup + 1),
        preset.learning_rate / 10,
    )  # fmt: skip


def build(spec: RunSpec, preset: Preset, seed: int):
    """``(model, optimizer, loss_fn)`` of a run, before training.

    ``loss_fn(model, inputs, targets)`` is the mean next-token cross-entropy (nats/token).
    """
    from jaxq.wrapping import Rule, quantize_model

    init_key = jax.random.fold_in(jax.random.key(seed), 0)
    schedule = _schedule(preset)
    if spec.model == "unit_scaled":
        from jaxq import unit_scaling as us

        model = us.TransformerDecoder(
            features=preset.d_model, layers=preset.n_layers, heads=preset.n_heads,
            dot_general=us.fp8_dot_general, rngs=nnx.Rngs(params=init_key),
        )  # fmt: skip
        # u-μP's learning rates are per-parameter multiples of one global rate (2^-2 is the
        # best rate of the width sweep in benchmarks/results/umup_transfer.md).
        lr = optax.warmup_cosine_decay_schedule(
            0.0, 0.25, max(1, preset.steps // 10), max(preset.steps, 2), 0.025
        )  # fmt: skip
        return model, us.optim.adamw(lr, tags=model), _lm_loss
    model = GPT(preset.gpt_config(spec.compute_dtype), rngs=nnx.Rngs(params=init_key))
    if spec.recipe is not None:
        rules = [Rule(r"blocks/.*", recipe=spec.recipe(preset))]
        model = quantize_model(model, rules, key=jax.random.fold_in(jax.random.key(seed), 1))
    params = nnx.state(model, nnx.Param)
    make = {"adamw": optax.adamw, "adamw_8bit": optim.adamw_8bit}[spec.optimizer]
    tx = optax.chain(optax.clip_by_global_norm(1.0),
                     make(schedule, weight_decay=0.1, mask=_decay_mask(params)))  # fmt: skip
    return model, tx, _lm_loss


def _lm_loss(model, inputs, targets):
    return cross_entropy(model(inputs), targets)


def make_step(graphdef, tx: optax.GradientTransformation, loss_fn):
    """The jitted ``(params, rest, opt_state, inputs, targets) -> (params, rest, opt_state,
    loss)`` of a model split as ``nnx.split(model, nnx.Param, ...)``; the recipe state in
    ``rest`` is advanced from what the ops observed."""
    from jaxq import wrapping

    def step(params, rest, opt_state, inputs, targets):
        model = nnx.merge(graphdef, params, rest)
        loss, grads = wrapping.value_and_grad(loss_fn)(model, inputs, targets)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        _, _, rest = nnx.split(model, nnx.Param, ...)
        return params, rest, opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1, 2))


def make_eval(graphdef):
    """The jitted ``(state, inputs, targets) -> per-window mean cross-entropy`` of a model
    split as ``nnx.split(model)`` (:func:`window_losses` batches the windows)."""

    def per_window(state, x, y):
        logits = nnx.merge(graphdef, state)(x)
        return optax.softmax_cross_entropy_with_integer_labels(
            logits.astype(jnp.float32), y).mean(axis=-1)  # fmt: skip

    return jax.jit(per_window)


EVAL_BATCH = 64
"""Held-out windows per evaluation batch (one compiled shape: :func:`prepare_run`)."""


def window_losses(model, val_tokens, *, seq_len: int, windows: int,
                  batch_size: int = EVAL_BATCH, evaluate=None) -> float:  # fmt: skip
    """Mean cross-entropy (nats/token) of ``model`` on the first ``windows`` consecutive
    held-out windows of ``seq_len`` tokens (each position scored once, with its full left
    context in the window; :func:`jaxq.models.mean_window_loss`). ``evaluate``:
    :func:`make_eval` of the model's graph, possibly compiled ahead of time for
    ``(batch_size, seq_len)`` batches (default: made here)."""
    graphdef, state = nnx.split(model)
    per_window = make_eval(graphdef) if evaluate is None else evaluate
    return mean_window_loss(functools.partial(per_window, state), val_tokens, seq_len,
                            batch_size=batch_size, max_windows=windows)  # fmt: skip


@functools.lru_cache(maxsize=4)
def corpus(corpus_bytes: int) -> tuple[np.ndarray, np.ndarray]:
    """``(train, val)`` byte tokens of the default corpus (the last 10% held out)."""
    return data.split(data.load_tokens(max_bytes=corpus_bytes))


class PreparedRun:
    """A run built and compiled, ready to train (:func:`prepare_run`).

    Attributes:
        spec: the :class:`RunSpec`.
        graphdef, params, rest, opt_state: the split model and its optimizer state.
        step: the compiled train step (:func:`make_step`, compiled ahead of time).
        evaluate: the compiled held-out evaluation (:func:`make_eval`).
        weight_bytes, optimizer_bytes: as in :class:`RunResult`.
        seconds: wall time spent building and compiling.
    """

    def __init__(self, spec, graphdef, params, rest, opt_state, step, evaluate, seconds):
        self.spec, self.graphdef, self.params, self.rest = spec, graphdef, params, rest
        self.opt_state, self.step, self.evaluate = opt_state, step, evaluate
        self.seconds = seconds
        self.weight_bytes = optim.state_nbytes(params)
        self.optimizer_bytes = optim.state_nbytes(opt_state)


_TRACE_LOCK = threading.Lock()


def prepare_run(spec: RunSpec, preset: Preset, *, seed: int = 0) -> PreparedRun:
    """Builds a run's model and optimizer and compiles its train step ahead of time.

    Building and tracing hold a lock (they are Python work); XLA's compilation runs outside
    it, so several runs prepared from a thread pool compile on several cores at once while
    the timed training steps still run one run at a time (:func:`jaxq.demo.run.run`).
    """
    t_start = time.perf_counter()
    with _TRACE_LOCK:
        model, tx, loss_fn = build(spec, preset, seed)
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        opt_state = tx.init(params)
        batch = jax.ShapeDtypeStruct((preset.batch_size, preset.seq_len), jnp.int32)
        lowered = make_step(graphdef, tx, loss_fn).lower(params, rest, opt_state, batch, batch)
        full_graphdef, full_state = nnx.split(model)
        windows = jax.ShapeDtypeStruct((EVAL_BATCH, preset.seq_len), jnp.int32)
        lowered_eval = make_eval(full_graphdef).lower(full_state, windows, windows)
    step, evaluate = lowered.compile(), lowered_eval.compile()
    return PreparedRun(spec, graphdef, params, rest, opt_state, step, evaluate,
                       time.perf_counter() - t_start)  # fmt: skip


def train_run(spec: RunSpec, preset: Preset, *, seed: int = 0,
              on_step: Callable[[int, float], None] | None = None,
              prepared: PreparedRun | None = None) -> RunResult:  # fmt: skip
    """Trains one run of the demo and evaluates it.

    Args:
        spec: which run (:data:`RUNS`).
        preset: sizes (:data:`PRESETS`).
        seed: initialisation and data seed, shared by every run.
        on_step: called as ``on_step(step, loss)`` after every step (progress bars).
        prepared: the run from :func:`prepare_run` with the same arguments (default: prepared
            here).

    Returns:
        A :class:`RunResult`. A diverged run records non-finite losses rather than stopping.
        Its ``seconds`` include the preparation.
    """
    if prepared is None:
        prepared = prepare_run(spec, preset, seed=seed)
    t_start = time.perf_counter()
    if prepared.spec is not spec:
        raise ValueError(f"prepared is the run {prepared.spec.name!r}, not {spec.name!r}")
    train_np, val_np = corpus(preset.corpus_bytes)
    train_tokens = jnp.asarray(train_np)
    params, rest, opt_state = prepared.params, prepared.rest, prepared.opt_state
    prepared.params = prepared.rest = prepared.opt_state = None  # donated below
    sample = jax.jit(functools.partial(data.batch, batch_size=preset.batch_size,
                                       seq_len=preset.seq_len))  # fmt: skip
    data_key = jax.random.fold_in(jax.random.key(seed), 2)
    losses, times = [], []
    for i in range(preset.steps):
        inputs, targets = sample(train_tokens, jax.random.fold_in(data_key, i))
        t0 = time.perf_counter()
        params, rest, opt_state, loss = prepared.step(params, rest, opt_state, inputs, targets)
        loss = float(loss)
        times.append(time.perf_counter() - t0)
        losses.append(loss)
        if on_step is not None:
            on_step(i + 1, loss)
    model = nnx.merge(prepared.graphdef, params, rest)
    val = window_losses(model, val_np, seq_len=preset.seq_len, windows=preset.eval_windows,
                        batch_size=EVAL_BATCH, evaluate=prepared.evaluate)  # fmt: skip
    steady = times[2:] if len(times) > 3 else times
    return RunResult(spec, spec.label.format(g=preset.group), np.asarray(losses, np.float32),
                     val, float(np.min(steady)), prepared.weight_bytes,
                     prepared.optimizer_bytes, model,
                     prepared.seconds + time.perf_counter() - t_start)  # fmt: skip
