"""The serving half of ``jaxq demo``: the float32 run, quantized after training.

Each row converts the trained float32 GPT with :func:`jaxq.ptq.convert`: every projection
of the transformer blocks gets the row's scheme (the embeddings, LayerNorms and the tied
readout stay float32, as GPTQ/AWQ toolkits keep them), calibrated on a few training
batches, with the row's algorithms (:func:`jaxq.ptq.awq`, :func:`jaxq.ptq.gptq`) run
first. The row reports the held-out loss of the served model, the bytes of its whole
serving state, and the size on disk of that state saved with orbax.

Example:
    >>> from jaxq.demo.serving import SERVING
    >>> [s.name for s in SERVING.values()][:3]
    ['ptq_w8', 'ptq_w4', 'ptq_w4_awq']
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxq import data, optim, ptq
from jaxq.demo.training import Preset, corpus, window_losses
from jaxq.wrapping import Rule

__all__ = ["ServingSpec", "SERVING", "ServingResult", "serve_run", "calibration_batches",
           "checkpoint_bytes"]  # fmt: skip


@dataclasses.dataclass(frozen=True)
class ServingSpec:
    """One post-training quantization row.

    Attributes:
        name: the command-line name (``--recipes``).
        label: the row's name in the table (``{g}``: the preset's group size).
        scheme: ``scheme(preset)`` makes the serving recipe (:mod:`jaxq.ptq.schemes`).
        algorithms: plan builders run in order before converting (``"awq"``, ``"gptq"``).
    """

    name: str
    label: str
    scheme: Callable[[], Any]
    algorithms: tuple[str, ...] = ()


SERVING: dict[str, ServingSpec] = {
    s.name: s
    for s in (
        ServingSpec("ptq_w8", "PTQ W8 per-channel", lambda p: ptq.W8()),
        ServingSpec("ptq_w4", "PTQ W4 g{g} RTN", lambda p: ptq.W4(p.group)),
        ServingSpec("ptq_w4_awq", "PTQ W4 g{g} AWQ", lambda p: ptq.W4(p.group), ("awq",)),
        ServingSpec("ptq_w4_gptq", "PTQ W4 g{g} GPTQ", lambda p: ptq.W4(p.group), ("gptq",)),
        ServingSpec("ptq_nf4", "PTQ NF4 g64", lambda p: ptq.NF4(min(64, p.group))),
        ServingSpec("ptq_w8a8_fp8", "PTQ W8A8 FP8 (E4M3)", lambda p: ptq.W8A8("e4m3")),
        ServingSpec("ptq_nvfp4", "PTQ NVFP4", lambda p: ptq.NVFP4()),
    )
}

_ALGORITHMS = {"awq": ptq.awq, "gptq": ptq.gptq, "rotate": ptq.rotate,
               "smoothquant": ptq.smoothquant}  # fmt: skip


class ServingResult:
    """What one serving row measured.

    Attributes:
        spec: the :class:`ServingSpec`.
        label: the row's name.
        val_loss: held-out loss (nats/token) of the served model.
        weight_bytes: bytes of the whole serving state (packed codes and scales of the
            converted layers, float32 embeddings and norms).
        disk_bytes: size on disk of that state saved with orbax.
        seconds: wall time of calibration, algorithms and conversion.
        float_layers: layers left in float (none expected).
    """

    def __init__(self, spec, label, val_loss, weight_bytes, disk_bytes, seconds, float_layers):
        self.spec, self.label, self.val_loss = spec, label, val_loss
        self.weight_bytes = weight_bytes
        self.disk_bytes, self.seconds, self.float_layers = disk_bytes, seconds, float_layers


def calibration_batches(preset: Preset, *, seed: int = 0) -> list[jax.Array]:
    """``preset.calibration_batches`` batches of 8 training sequences (token ids)."""
    train_np, _ = corpus(preset.corpus_bytes)
    tokens = jnp.asarray(train_np)
    key = jax.random.fold_in(jax.random.key(seed), 3)
    return [data.batch(tokens, jax.random.fold_in(key, i), batch_size=8,
                       seq_len=preset.seq_len)[0]
            for i in range(preset.calibration_batches)]  # fmt: skip


def checkpoint_bytes(state, directory: str | Path | None = None) -> int:
    """Bytes on disk of ``state`` saved with orbax's ``StandardCheckpointer``.

    Saved under ``directory`` (kept) or a temporary directory (removed).
    """
    import orbax.checkpoint as ocp

    tmp = directory is None
    root = Path(tempfile.mkdtemp()) if tmp else Path(directory)
    try:
        path = (root / "checkpoint").absolute()
        if path.exists():
            shutil.rmtree(path)
        ckpt = ocp.StandardCheckpointer()
        ckpt.save(path, state)
        ckpt.wait_until_finished()
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    finally:
        if tmp:
            shutil.rmtree(root, ignore_errors=True)


def serve_run(spec: ServingSpec, model: nnx.Module, preset: Preset, batches,
              *, checkpoint_dir: str | Path | None = None) -> ServingResult:  # fmt: skip
    """Converts the trained float ``model`` with ``spec``'s scheme and measures it."""
    t0 = time.perf_counter()
    rules = [Rule(r"blocks/.*", recipe=spec.scheme(preset))]
    plan = None
    for name in spec.algorithms:
        plan = _ALGORITHMS[name](model, None, rules, batches, plan=plan)
    served = ptq.convert(model, None, rules, calibration=batches, plan=plan)
    seconds = time.perf_counter() - t0
    _, val_np = corpus(preset.corpus_bytes)
    val = window_losses(served.model, val_np, seq_len=preset.seq_len,
                        windows=preset.eval_windows)  # fmt: skip
    state = nnx.state(served.model)
    return ServingResult(spec, spec.label.format(g=preset.group), val,
                         optim.state_nbytes(state),
                         checkpoint_bytes(state, checkpoint_dir), seconds,
                         list(served.float_layers))  # fmt: skip
