"""End-to-end fidelity of the low-precision training recipes on a small language model.

The protocol (DESIGN.md, "Measuring"): the same :class:`jaxq.models.GPT`, data, seed,
steps and optimizer are trained once in float32 and once with each recipe of
:mod:`jaxq.recipes` on every hidden projection (``qkv``, ``out``, ``up``, ``down`` of every
block, see :mod:`jaxq.models.lowp`); the final validation cross-entropies (of the
quantized forward) are compared. Budgets, one-sided (ending below float32 passes, and is
printed):

| recipe | budget |
|---|---|
| fp8_current, fp8_delayed, fp8_blockwise, mxfp8 | 1% |
| nvfp4 (random Hadamard on the weight gradient, stochastic rounding of gradients) | 5% |
| int8 (QAT) | 1% |
| int4 (g128, learned steps, QAT) | 3% |
| ternary, mxfp4, fp8_static | reported only: finite and below the unigram entropy |

``fp8_static`` (fixed scale 1) is meant for unit-scaled models; this GPT is not one (its
weights start at std 0.02), so its figure is reported, not held to a budget.

The learned step sizes of ``int4`` are trained by the same AdamW as the weights but
without weight decay (decaying a quantizer's step towards zero is not regularisation);
every other parameter is treated exactly as in the float32 run.

Block sizes: the full run uses ``FP8Blockwise(block_size=128)`` and ``Int4(block_size=128)``
(d_model = 128, d_ff = 512, so every contraction is a multiple of 128). The short setup's
d_model = 64 does not divide into 128-blocks, so there the two use ``block_size=64``.

Short run (fast suite): float32 and fp8_delayed (FP8 casts plus the amax-history state
threaded through the step) on SHORT, about 100 s of CPU together; every further recipe
costs another 35-50 s of CPU at 600 steps (NVFP4's step alone compiles for over a minute
on 2 cores), which the fast suite cannot afford. 600 steps, because the float32 seed
spread is what the budget has to absorb: seeds 0, 1, 2 end at 2.1671, 2.1638, 2.1645
(0.16%) after 600 steps but at 2.556, 2.465, 2.404 (6%) after 300, while the run is still
leaving the unigram/bigram plateau. The short budget is the full budget plus 0.2%.

Full run (``make fidelity``): every recipe on d_model = 128 (4 heads, 2 layers, seq 64),
600 steps of the same schedule on 1 MB of corpus, comparing the mean over seeds 0 to 3.
Its float32 runs end at 1.9443, 1.9476, 1.9534 and 1.9455 (0.47% apart), far below the
unigram entropy 3.179, so the comparison is made after the model has learned, not on a
plateau. Four seeds, because two are not enough: the quantized runs' seed spread is
about 1-2% here, and fp8_blockwise measured +1.39% over seeds 0 and 1 but -0.14% over
seeds 2 and 3.

Measured 2026-12-01, FULL (seeds 0 and 1, then 2 and 3 with the same code; float32 mean
1.9477; two runs in parallel on 2 cores):

| recipe | seed 0 | seed 1 | seed 2 | seed 3 | mean | vs float32 | budget | verdict |
|---|---:|---:|---:|---:|---:|---:|---:|---|
| fp8_current | 1.9620 | 1.9549 | 1.9513 | 1.9488 | 1.9542 | +0.34% | 1% | met |
| fp8_delayed | 1.9561 | 1.9651 | 1.9515 | 1.9529 | 1.9564 | +0.45% | 1% | met |
| fp8_blockwise (128) | 1.9741 | 1.9719 | 1.9425 | 1.9510 | 1.9599 | +0.63% | 1% | met |
| mxfp8 | 1.9503 | 1.9702 | 1.9341 | 1.9447 | 1.9498 | +0.11% | 1% | met |
| nvfp4 | 2.0451 | 2.0095 | 2.0006 | 1.9866 | 2.0104 | +3.22% | 5% | met |
| int8 | 1.9499 | 1.9620 | 1.9675 | 1.9290 | 1.9521 | +0.23% | 1% | met |
| int4 (g128, learned steps) | 1.9593 | 1.9862 | 1.9770 | 1.9497 | 1.9681 | +1.05% | 3% | met |
| ternary | 2.0647 | 2.0614 | 2.0633 | 2.0460 | 2.0589 | +5.71% | reported | |
| mxfp4 | 1.9946 | 2.0511 | 2.0051 | 2.0038 | 2.0136 | +3.39% | reported | |
| fp8_static | 3.0810 | 3.0496 | 2.8840 | 3.0514 | 3.0165 | +54.9% | reported | (not unit-scaled) |

fp8_blockwise over seeds 0 and 1 alone (+1.39%), taken apart on the same setup before
seeds 2 and 3 were run (mean of seeds 0 and 1 against 1.9460): with 32-blocks +0.84%;
1×128 activation tiles alone (per-tensor E4M3 weights, per-tensor E5M2 gradients) +0.67%;
128×128 weight blocks alone +0.77%; both with per-tensor E5M2 gradients +1.39%; per-tensor
E4M3 forward with 1×128 E4M3 gradient tiles +0.27%; E5M2 gradient tiles +2.16%; float
backward operands +7.19% (seed 1 alone +11.9%). A single product is more accurate with
128-blocks than per tensor (forward 3.3% against 3.8% relative L2, gradients 3.7% against
5.9%). With seeds 2 and 3 the gap is within the seed spread, so these two-seed variant
figures are not evidence of a defect in either piece.

Measured 2026-11-30 (jaxq.ops and jaxq.recipes were being revised during the runs), SHORT
setup, seed 0 (one run each; float32 2.1671; float32 seed spread 0.16%; wall time of one
training run, compile and evaluation included, on a 2-core CPU shared with other jobs, so
only roughly comparable):

| recipe | val loss | vs float32 | budget (full / short) | result | wall s |
|---|---:|---:|---|---|---:|
| float32 | 2.1671 | | | | 103-124 |
| fp8_current | 2.1795 | +0.57% | 1% / 1.2% | met | 127 |
| fp8_delayed | 2.1829 | +0.73% | 1% / 1.2% | met | 163 |
| fp8_blockwise (block 64) | 2.1840 | +0.78% | 1% / 1.2% | met | 183 |
| mxfp8 | 2.1902 | +1.06% | 1% / 1.2% | short met, over 1%; seeds 0+1: +0.98% | 174 |
| nvfp4 | 2.1980 | +1.43% | 5% / 5.2% | met | 568 |
| int8 | 2.1946 | +1.27% | 1% / 1.2% | short MISSED; seeds 0+1: +0.72% | 159 |
| int4 (block 64, learned steps) | 2.1772 | +0.46% | 3% / 3.2% | met | 77 |
| ternary | 2.2639 | +4.47% | reported | finite, learned | 91 |
| mxfp4 | 2.2308 | +2.94% | reported | finite, learned | 264 |
| fp8_static | 3.0424 | +40.39% | reported | finite, barely below h1 = 3.179 | 45 |

The mxfp8 and mxfp4 rows here and below were measured with the OCP scale rule, before the
MX recipes rounded their scales up (``scale_rounding="up"``). Re-measured 2026-12-01 on the
SHORT setup, seeds 0 / 1 (float32 2.1671 / 2.1638), rounding up against the OCP rule:
mxfp8 2.1812 / 2.1658 (mean +0.37%) against 2.1902 / 2.1831 (+0.98%); mxfp4 2.2128 /
2.2048 (+2.00%) against 2.2308 / 2.2155 (+2.66%).

Seed 1 (float32 2.1638) for the two closest to their budget: int8 2.1675 (+0.17%), mxfp8
2.1831 (+0.89%); so over seeds 0 and 1 int8 is +0.72% and mxfp8 +0.98%, both inside 1%, and
int8's seed-0 excess (+1.27%) is above the short budget: it is not in the fast suite, the
full run decides it.

A first full run on a smaller setup (d_model 128, seq_len 64, 500 steps, 4 MB corpus,
seeds 0 and 1) gave no verdict: its float32 runs ended at 3.0340 and 2.7943 (an 8% seed
spread, seed 0 still on the plateau, above the ``h1 - 0.7 = 2.449`` gate; unigram entropy
h1 = 3.149), so every test failed the float32 gate. Its figures (per-seed loss; mean;
difference of the means vs float32 2.9141; wall seconds per run, two runs in parallel on
2 shared cores) are kept here for the record; they are inside the float32 noise:

| recipe | seed 0 | seed 1 | mean | vs float32 | wall s |
|---|---:|---:|---:|---:|---:|
| float32 | 3.0340 | 2.7943 | 2.9141 | | 203, 184 |
| fp8_current | 2.8224 | 2.7460 | 2.7842 | -4.46% | 195, 259 |
| fp8_delayed | 2.8128 | 2.9131 | 2.8630 | -1.76% | 198, 258 |
| fp8_blockwise (128) | 2.7422 | 2.8170 | 2.7796 | -4.62% | 390, 315 |
| mxfp8 | 3.2554 | 2.8100 | 3.0327 | +4.07% | 404, 374 |
| nvfp4 | 2.8393 | 2.8152 | 2.8272 | -2.98% | 712, 700 |
| int8 | 2.7714 | 2.8285 | 2.7999 | -3.92% | 173, 219 |
| int4 (g128, learned) | 3.1699 | 2.7967 | 2.9833 | +2.37% | 219, 175 |
| ternary | 2.8078 | 2.8127 | 2.8102 | -3.57% | 321, 250 |
| mxfp4 | 2.8512 | 2.8711 | 2.8612 | -1.82% | 613, 486 |
| fp8_static | 3.7334 | 3.6689 | 3.7011 | +27.01% | 232, 204 |
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import numpy as np
import optax
import pytest
from xla_options import RUN_BOUND

from jaxq import data, recipes
from jaxq.models import GPTConfig, train
from jaxq.models.lowp import hidden_linears


@dataclasses.dataclass(frozen=True)
class Setup:
    config: GPTConfig
    steps: int
    batch_size: int
    lr: float = 3e-3
    weight_decay: float = 0.1
    max_bytes: int = 1_000_000
    eval_windows: int = 256
    seeds: tuple[int, ...] = (0,)
    block_size: int = 128  # of fp8_blockwise and int4

    def schedule(self):
        return optax.warmup_cosine_decay_schedule(0.0, self.lr, self.steps // 10, self.steps, 0.0)


SHORT = Setup(
    GPTConfig(d_model=64, n_heads=4, n_layers=2, seq_len=64), steps=600, batch_size=16,
    block_size=64,
)  # fmt: skip
FULL = Setup(
    GPTConfig(d_model=128, n_heads=4, n_layers=2, seq_len=64), steps=600, batch_size=16,
    seeds=(0, 1, 2, 3),
)  # fmt: skip


def make_recipe(setup: Setup, name: str):
    if name == "float32":
        return None
    if name == "fp8_blockwise":
        return recipes.FP8Blockwise(block_size=setup.block_size)
    if name == "int4":
        return recipes.Int4(block_size=setup.block_size, learned_step=True)
    return recipes.NAMED[name]()


BUDGETS = {
    "fp8_current": 0.01, "fp8_delayed": 0.01, "fp8_blockwise": 0.01, "mxfp8": 0.01,
    "nvfp4": 0.05, "int8": 0.01, "int4": 0.03,
    "ternary": None, "mxfp4": None, "fp8_static": None,  # reported only
}  # fmt: skip
# Float32 validation loss of SHORT over seeds 0, 1, 2: 2.1671, 2.1638, 2.1645 (range 0.16%;
# at 300 steps it was 2.556, 2.465, 2.404, a 6% range, hence 600 steps).
# The short run compares one seed, so its budgets add that spread to the full budgets.
SHORT_SPREAD = 0.002
SHORT_BUDGETS = {"fp8_delayed": 0.01}
SHORT_BUDGETS = {k: v + SHORT_SPREAD for k, v in SHORT_BUDGETS.items()}
WALL: dict[tuple, float] = {}


def _no_decay_on_steps(tree):
    """AdamW's weight-decay mask: everything but the learned quantizer steps."""
    return {k: jax.tree.map(lambda _, k=k: k != "steps", v) for k, v in tree.items()}


@functools.cache
def unigram_entropy(max_bytes: int) -> float:
    """Entropy (nats) of the training split's byte distribution: the best context-free loss."""
    train_tokens, _ = data.split(data.load_tokens(max_bytes=max_bytes))
    p = np.bincount(train_tokens, minlength=256) / len(train_tokens)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


@functools.cache
def run(setup: Setup, name: str, seed: int = 0):
    opt = optax.adamw(setup.schedule(), weight_decay=setup.weight_decay,
                      mask=_no_decay_on_steps)  # fmt: skip
    t0 = time.perf_counter()
    result = train(
        setup.config, opt, steps=setup.steps, seed=seed, batch_size=setup.batch_size,
        max_bytes=setup.max_bytes, eval_windows=setup.eval_windows,
        compiler_options=RUN_BOUND,
        recipe=make_recipe(setup, name),
    )  # fmt: skip
    WALL[(setup, name, seed)] = time.perf_counter() - t0
    return result


def compare(setup: Setup, name: str) -> float:
    """Relative excess of the mean validation loss over ``setup.seeds`` (printed)."""
    base = [run(setup, "float32", s) for s in setup.seeds]
    quant = [run(setup, name, s) for s in setup.seeds]
    b_loss = float(np.mean([r.val_loss for r in base]))
    q_loss = float(np.mean([r.val_loss for r in quant]))
    rel = q_loss / b_loss - 1.0
    per_seed = ", ".join(
        f"seed {s}: {q.val_loss:.4f} vs {b.val_loss:.4f} "
        f"({WALL[(setup, name, s)]:.0f} s vs {WALL[(setup, 'float32', s)]:.0f} s)"
        for s, q, b in zip(setup.seeds, quant, base, strict=True)
    )
    better = " (better than float32)" if rel < 0 else ""
    print(f"\n{name}: mean val {q_loss:.4f} vs float32 {b_loss:.4f} ({rel:+.2%}{better}; "
          f"{per_seed})")  # fmt: skip
    return rel


def _check(setup: Setup, name: str, budget: float | None) -> None:
    h1 = unigram_entropy(setup.max_bytes)
    rel = compare(setup, name)  # trains (cached) and prints before anything is asserted
    for seed in setup.seeds:
        base, quant = run(setup, "float32", seed), run(setup, name, seed)
        assert np.all(np.isfinite(base.losses))
        # The float run must have learned far more than byte frequencies, or a comparison
        # near the unigram plateau would say nothing about the recipe.
        assert base.val_loss < h1 - 0.7, (base.val_loss, h1)
        assert np.all(np.isfinite(quant.losses)) and np.isfinite(quant.val_loss)
        # Every hidden projection ran through the recipe (one state entry each), and the
        # quantized run really differs from the float one.
        assert sorted(quant.recipe_state) == sorted(hidden_linears(quant.model))
        assert len(quant.recipe_state) == 4 * setup.config.n_layers
        assert quant.val_loss != base.val_loss
        if budget is None:
            assert quant.val_loss < h1, (name, quant.val_loss, h1)
    if budget is not None:
        assert rel <= budget, f"{name}: {rel:+.2%} vs budget +{budget:.0%}"


@pytest.mark.sweep
@pytest.mark.parametrize("name", sorted(SHORT_BUDGETS))
def test_short_fidelity(name):
    _check(SHORT, name, SHORT_BUDGETS[name])


# The slowest first, so that `pytest -n 2` balances its workers.
FULL_ORDER = [
    "nvfp4", "mxfp4", "fp8_blockwise", "mxfp8", "ternary", "int8", "fp8_delayed",
    "fp8_current", "fp8_static", "int4",
]  # fmt: skip


@pytest.mark.fidelity
@pytest.mark.parametrize("name", FULL_ORDER)
def test_full_fidelity(name):
    _check(FULL, name, BUDGETS[name])
