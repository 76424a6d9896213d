"""Every script in examples/ runs end to end in its --tiny mode, as a user would run it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SCRIPTS = [
    "fp8_training_linen",
    "qat_int4_nnx",
    "ptq_gptq_awq",
    "optimizer_8bit",
    "scalify_float16",
    "unit_scaled_fp8",
    "data_parallel_fp8",
    "kv_cache_decode",
    "qlora_finetune",
]
# Tiny runs spend most of their time compiling; XLA's CPU backend optimizations only add to
# it there. The data-parallel example needs eight host devices.
FLAGS = "--xla_backend_optimization_level=0"
DEVICES = "--xla_force_host_platform_device_count=8"
TIMEOUT_S = 300


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


@pytest.mark.parametrize("name", SCRIPTS)
def test_example_runs_in_tiny_mode(name):
    env = dict(os.environ, XLA_FLAGS=FLAGS + (f" {DEVICES}" if name == "data_parallel_fp8" else ""))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(EXAMPLES / f"{name}.py"), "--tiny"], env=env,
                          capture_output=True, text=True, timeout=TIMEOUT_S)  # fmt: skip
    seconds = time.perf_counter() - t0
    assert proc.returncode == 0, (
        f"examples/{name}.py --tiny exited with {proc.returncode} after {seconds:.0f} s\n"
        f"--- stdout (tail) ---\n{_tail(proc.stdout)}\n--- stderr (tail) ---\n{_tail(proc.stderr)}"
    )
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith(f"RESULT {name}:"), _tail(proc.stdout)
    print(f"{name}: {seconds:.1f} s\n{last}")
