"""u-muP hyperparameter transfer, measured (slow): the best global learning rate on a
factor-2 grid at width 64 is within one grid step of the best at width 256, for a short
run on the default corpus. The same sweep as ``benchmarks/umup_transfer.py``."""

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest

_PATH = Path(__file__).parents[2] / "benchmarks" / "umup_transfer.py"


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("umup_transfer", _PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.fidelity
def test_best_learning_rate_transfers_from_width_64_to_256():
    bench = _load_benchmark()
    res = bench.sweep()
    for w, losses in res["losses"].items():
        assert np.isfinite(losses).sum() >= 3, (w, losses)  # a real sweep, not all diverged
        i = int(np.nanargmin(losses))
        assert 0 < i < len(losses) - 1, f"width {w}: best lr at the grid edge {losses}"
    assert min(min(v) for v in res["losses"].values()) < 0.6 * math.log(256)
    assert bench.grid_steps_apart(res["best"]) <= 1, res
