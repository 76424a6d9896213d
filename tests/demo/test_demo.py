"""Tests of ``jaxq demo``: the runs, the table, the files and the command line.

The tests on a demo run are marked ``sweep`` (short end-to-end training runs, about three
minutes on 2 cores): the newest-JAX pass of ``make test`` leaves them to the first pass."""

import dataclasses
import json
import math

import numpy as np
import pytest
from flax import nnx

from jaxq.cli import main
from jaxq.demo.run import NAMES, run, select
from jaxq.demo.training import RUNS, Preset, corpus, train_run
from jaxq.models.train import evaluate

TINY = Preset(d_model=32, n_heads=2, n_layers=1, seq_len=32, batch_size=4, steps=6,
              learning_rate=3e-3, eval_windows=8, corpus_bytes=60_000, calibration_batches=2)
NAMES_RUN = ["fp8_delayed", "int4", "unit_fp8", "adamw_8bit", "ptq_w4", "ptq_nf4"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return run(NAMES_RUN, preset=TINY, seed=0, out=out, progress=False, log=lambda *_: None)


@pytest.mark.sweep
def test_rows_in_table_order_with_float32_first(demo):
    names = [r["name"] for r in demo["table"]]
    assert names == ["float32", "fp8_delayed", "int4", "unit_fp8", "adamw_8bit", "ptq_w4",
                     "ptq_nf4"]
    assert [r["kind"] for r in demo["table"]] == ["train"] * 5 + ["serve"] * 2


@pytest.mark.sweep
def test_ratios_are_against_the_float32_row(demo):
    table = {r["name"]: r for r in demo["table"]}
    base = table["float32"]
    assert base["vs_float32"] == 0.0 and base["step_ratio"] == 1.0
    for r in demo["table"]:
        assert math.isfinite(r["val_loss"]) and 0 < r["val_loss"] < math.log(256) + 0.5
        assert r["vs_float32"] == pytest.approx(r["val_loss"] / base["val_loss"] - 1)
        if r["kind"] == "train":
            assert r["step_ratio"] == pytest.approx(r["step_seconds"] / base["step_seconds"])
            assert len(r["losses"]) == TINY.steps
            assert np.mean(r["losses"][-2:]) < r["losses"][0]  # it learned something


@pytest.mark.sweep
def test_bytes_are_what_the_formats_promise(demo):
    table = {r["name"]: r for r in demo["table"]}
    f32 = table["float32"]
    # AdamW keeps two float32 moments per parameter (plus a step count).
    assert f32["optimizer_bytes"] == pytest.approx(2 * f32["weight_bytes"], rel=1e-3)
    # 8-bit moments: 2 bytes per parameter plus block scales, small tensors in float32.
    assert table["adamw_8bit"]["optimizer_bytes"] < 0.45 * f32["optimizer_bytes"]
    # Learned int4 steps add one float32 per group of 128 weights and per layer.
    assert f32["weight_bytes"] < table["int4"]["weight_bytes"] < 1.05 * f32["weight_bytes"]
    # Serving W4 g32: each block kernel's float32 element becomes half a byte of code plus
    # a float32 scale per 32; embeddings, norms and biases stay as they were.
    params = nnx.state(demo_model(demo), nnx.Param)
    block = sum(x.size for path, x in _leaves(params) if "blocks/" in path and
                "/kernel" in path)
    want = f32["weight_bytes"] - 4 * block + block * (0.5 + 4 / 32)
    assert table["ptq_w4"]["weight_bytes"] == pytest.approx(want, rel=0.01)
    for name in ("ptq_w4", "ptq_nf4"):
        assert table[name]["disk_bytes"] > 0


def demo_model(demo):
    return demo["trained"][0].model


def _leaves(state):
    import jax

    for path, x in jax.tree_util.tree_leaves_with_path(state):
        yield "/".join(str(getattr(k, "key", k)) for k in path), x


@pytest.mark.sweep
def test_files_are_written(demo):
    out = demo["out"]
    md = (out / "results.md").read_text()
    assert "| float32 |" in md and "PTQ NF4 g64" in md
    data = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in data["runs"]] == [r["name"] for r in demo["table"]]
    assert data["meta"]["preset"]["steps"] == TINY.steps
    for name in ("loss_curves.png", "scales_fp8_delayed.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.sweep
def test_held_out_loss_matches_an_independent_evaluation(demo):
    result = demo["trained"][0]
    assert result.spec.name == "float32"
    _, val = corpus(TINY.corpus_bytes)
    want = evaluate(result.model, val, max_windows=TINY.eval_windows)
    assert result.val_loss == pytest.approx(want, rel=1e-5)
    params = nnx.state(result.model, nnx.Param)
    assert result.weight_bytes == 4 * sum(x.size for _, x in _leaves(params))


@pytest.mark.sweep
def test_same_seed_same_run_and_runs_share_initialisation(demo):
    first = demo["trained"][0]
    again = train_run(RUNS["float32"], dataclasses.replace(TINY, steps=2), seed=0)
    # The first update has learning rate 0 (warm-up), so both runs see the same two losses.
    np.testing.assert_array_equal(again.losses, first.losses[:2])
    fp8 = demo["trained"][1]
    assert fp8.spec.name == "fp8_delayed"
    # Same initialisation and first batch: the first losses agree to FP8 precision.
    assert fp8.losses[0] == pytest.approx(first.losses[0], rel=2e-2)
    assert fp8.losses[0] != first.losses[0]


def test_select_always_includes_float32_and_rejects_unknown_names():
    assert [s.name for s in select(["ptq_w8"])] == ["float32", "ptq_w8"]
    assert [s.name for s in select(None)] == list(NAMES)
    with pytest.raises(ValueError, match="valid: float32, bf16"):
        select(["fp8", "int4"])


def test_cli_unknown_recipe_exits_2_and_lists_valid_names(capsys):
    assert main(["demo", "--recipes", "fp8_current,fp7"]) == 2
    err = capsys.readouterr().err
    assert "fp7" in err and "fp8_current, fp8_delayed" in err and "ptq_nvfp4" in err
    assert main(["demo", "--steps", "0"]) == 2


def test_cli_help_lists_the_runs(capsys):
    with pytest.raises(SystemExit) as e:
        main(["demo", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for name in ("--recipes", "--steps", "--seed", "--out", "--preset", "nvfp4", "ptq_w4_gptq"):
        assert name in out
