"""Benchmark of jaxq.lora: fine-tuning a pretrained GPT fully, with LoRA, QLoRA and L4Q.

The pretrained model is the benchmarks' GPT (:func:`common.trained_gpt`: 4 layers,
d_model 256, trained on the first 1 MB of the default corpus, i.e. the standard library's
sorted ``*.py`` files up to ``configparser.py``). It is fine-tuned on *other* files: the
files after that first megabyte are split by file into a fine-tuning set (every other
file) and a validation set (the files between them), so fine-tuning text, validation text
and pretraining text never share a file.

Each method runs the same steps, batches, warm-up + cosine schedule and seed:

* full fine-tuning in float32 (``optax.adamw``, every parameter);
* LoRA over the float32 base (``jaxq.lora.FLOAT``; ``optax.adamw`` on the adapters);
* QLoRA over an NF4 (groups of 64) base, adapters trained with ``jaxq.optim.adamw_8bit``;
  then merged and re-quantized by round-to-nearest to int4 g128 (``jaxq.ptq.W4(128)``),
  and merged back into NF4;
* L4Q over an int4 g128 base with learned step sizes (``jaxq.lora.L4Q(128)``; its steps,
  learned as ``log s``, take ``--l4q-step-lr-scale`` times the adapters' learning rate
  through ``jaxq.lora.optimizer``), merged with its learned steps into an int4 g128
  serving model.

Adapters (rank ``--rank``, alpha ``2 * rank``) sit on every projection of the blocks;
embeddings, LayerNorms, biases and the tied readout stay frozen (float32). Reported: the
validation loss (nats/token) of each model, and the bytes of its training state:
parameters (the frozen base as stored, packed or float), the trainable adapters (and
L4Q's steps), and the optimizer state.

Usage:
    python benchmarks/lora.py                  # writes benchmarks/results/lora.md (+ .json)
    python benchmarks/lora.py --steps 40 --out /tmp/lora.md   # a quick look
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from common import CONFIG, machine, trained_gpt
from flax import nnx

import jaxq
from jaxq import data, lora, optim, ptq
from jaxq.models.train import cross_entropy, evaluate, make_train_step, merge_model, split_model
from jaxq.ops import Quantizer, Recipe

PRETRAIN_BYTES = 1_000_000  # what common.trained_gpt reads


def finetune_split(train_bytes: int, val_bytes: int):
    """``(train tokens, val tokens, train files, val files)`` from the files after the
    pretraining megabyte (alternating files, each set cut at its byte budget)."""
    files, seen = [], 0
    for f in data.stdlib_files():
        if seen >= PRETRAIN_BYTES:
            files.append(f)
        seen += f.stat().st_size

    def take(paths, budget):
        out, chosen = [], []
        for p in paths:
            if sum(map(len, out)) >= budget:
                break
            out.append(p.read_bytes())
            chosen.append(p.name)
        tokens = np.frombuffer(b"".join(out)[:budget], np.uint8).astype(np.int32)
        return tokens, chosen

    train, train_files = take(files[0::2], train_bytes)
    val, val_files = take(files[1::2], val_bytes)
    return train, val, train_files, val_files


def schedule(peak: float, steps: int):
    return optax.warmup_cosine_decay_schedule(0.0, peak, max(1, steps // 10), steps, peak / 10)


def finetune_full(model, tokens, args):
    graphdef, params = split_model(model)
    params = jax.tree.map(jnp.copy, params)  # the step donates them; keep the pretrained model
    tx = optax.adamw(schedule(args.lr_full, args.steps), weight_decay=0.0)
    opt_state = tx.init(params)
    state_bytes = {"trainable": ptq.weight_bytes(params),
                   "optimizer": optim.state_nbytes(opt_state)}  # nothing frozen  # fmt: skip
    step = make_train_step(graphdef, tx)
    sample = jax.jit(lambda k: data.batch(tokens, k, batch_size=args.batch, seq_len=CONFIG.seq_len))
    key, losses = jax.random.key(args.seed), []
    for i in range(args.steps):
        x, y = sample(jax.random.fold_in(key, i))
        params, opt_state, loss = step(params, opt_state, x, y)
        losses.append(float(loss))
    return merge_model(graphdef, params), losses, state_bytes


def finetune_adapters(model, tokens, tx, args):
    """Trains ``model``'s ``nnx.LoRAParam`` (adapters, L4Q steps) in place."""
    opt = nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)
    trainable = nnx.state(model, nnx.LoRAParam)
    state_bytes = {
        "base": ptq.weight_bytes(nnx.state(model, nnx.Not(nnx.LoRAParam))),
        "trainable": ptq.weight_bytes(trainable),
        "optimizer": optim.state_nbytes(opt.opt_state),
    }

    @nnx.jit
    def step(model, opt, x, y):
        def loss_fn(m):
            return cross_entropy(m(x), y)

        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
        opt.update(model, grads)
        return loss

    sample = jax.jit(lambda k: data.batch(tokens, k, batch_size=args.batch, seq_len=CONFIG.seq_len))
    key, losses = jax.random.key(args.seed), []
    for i in range(args.steps):
        x, y = sample(jax.random.fold_in(key, i))
        losses.append(float(step(model, opt, x, y)))
    return losses, state_bytes


def rules_for(recipe):
    return [jaxq.Rule(".*readout.*|.*head.*", recipe=None), jaxq.Rule(".*", recipe=recipe)]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=150, help="fine-tuning steps per method")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--lr-full", type=float, default=3e-4, help="peak lr, full fine-tuning")
    ap.add_argument("--lr", type=float, default=2e-3, help="peak lr, adapters")
    ap.add_argument("--l4q-step-lr-scale", type=float, default=10.0,
                    help="L4Q's steps: this times the adapters' peak lr (plain Adam)")
    ap.add_argument("--train-bytes", type=int, default=400_000)
    ap.add_argument("--val-bytes", type=int, default=100_000)
    ap.add_argument("--windows", type=int, default=512, help="validation windows scored")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "lora.md"))
    args = ap.parse_args(argv)

    pretrained, log, train_tokens, _ = trained_gpt()
    ft_train, ft_val, train_files, val_files = finetune_split(args.train_bytes, args.val_bytes)
    ft_train = jnp.asarray(ft_train)
    cal = [data.batch(ft_train, jax.random.key(99), batch_size=4, seq_len=CONFIG.seq_len)[0]]
    config = lora.LoRA(rank=args.rank, alpha=2.0 * args.rank)

    def score(m):
        return evaluate(m, ft_val, max_windows=args.windows)

    rows, t0 = [], time.time()

    def add(name, model, *, state=None, losses=None, seconds=0.0, note=""):
        val = score(model)
        total = None if state is None else sum(state.values())
        rows.append({"row": name, "val_loss": val, "state": state, "state_total": total,
                     "final_train_loss": None if not losses else float(np.mean(losses[-20:])),
                     "seconds": seconds, "note": note})  # fmt: skip
        print(f"  {name:34s} val {val:.4f}  state {total and total / 2**20 or 0:.2f} MiB  "
              f"({seconds:.0f} s; {time.time() - t0:.0f} s total)", flush=True)  # fmt: skip

    add("pretrained, float32", pretrained)
    rtn = ptq.convert(pretrained, None, rules_for(ptq.W4(128)), calibration=cal)
    add("pretrained, RTN int4 g128", rtn.model)

    t = time.time()
    full, losses, state = finetune_full(pretrained, ft_train, args)
    add("full fine-tuning, float32", full, state=state, losses=losses, seconds=time.time() - t)

    def adamw_8bit():
        return optim.adamw_8bit(schedule(args.lr, args.steps), weight_decay=0.0)

    l4q_steps = optax.adam(schedule(args.lr * args.l4q_step_lr_scale, args.steps))
    runs = [
        ("LoRA, float32 base", lora.FLOAT, optax.adamw(schedule(args.lr, args.steps),
                                                       weight_decay=0.0)),
        ("QLoRA, NF4 g64 base", ptq.NF4(64), adamw_8bit()),
        ("L4Q, int4 g128 base", lora.L4Q(128), lora.optimizer(adamw_8bit(), steps=l4q_steps)),
    ]  # fmt: skip
    adapted = {}
    for name, recipe, tx in runs:
        t = time.time()
        out = lora.adapt(pretrained, None, rules_for(recipe), config, calibration=cal,
                         key=jax.random.key(args.seed))  # fmt: skip
        losses, state = finetune_adapters(out.model, ft_train, tx, args)
        adapted[recipe.name] = out.model
        add(name, out.model, state=state, losses=losses, seconds=time.time() - t)

    qlora = adapted[ptq.NF4(64).name]
    served = lora.merge(qlora, rules=rules_for(ptq.W4(128)))
    add("QLoRA -> merged, RTN int4 g128", served.model, note="serving")
    mse = Recipe("w4g128_mse", None, Quantizer("int4", "block", 128, calibration=jaxq.MSE()))
    served = lora.merge(qlora, rules=rules_for(mse))
    add("QLoRA -> merged, RTN int4 g128, MSE clipping", served.model, note="serving")
    served = lora.merge(qlora)
    add("QLoRA -> merged, RTN NF4 g64", served.model, note="serving")
    served = lora.merge(adapted[lora.L4Q(128).name])
    add("L4Q -> merged, int4 g128 (learned steps)", served.model, note="serving")
    write(args, log, rows, train_files, val_files, time.time() - t0)


def _row(name, rows):
    return next(r for r in rows if r["row"].startswith(name))


def goals(rows) -> list[str]:
    lo, ql = _row("LoRA, float32", rows), _row("QLoRA, NF4", rows)
    l4q, rtn = _row("L4Q -> merged", rows), _row("QLoRA -> merged, RTN int4", rows)
    gap = ql["val_loss"] / lo["val_loss"] - 1.0
    frac = ql["state_total"] / lo["state_total"]
    ok1 = gap <= 0.02 and frac <= 0.30
    ok2 = l4q["val_loss"] < rtn["val_loss"]
    mse = _row("QLoRA -> merged, RTN int4 g128, MSE", rows)
    return [
        f"- QLoRA within 2% of LoRA on a float base at <= 30% of its training-state bytes: "
        f"{'met' if ok1 else 'MISSED'} (validation loss {100 * gap:+.2f}%, state "
        f"{frac:.3f}x).",
        f"- L4Q's merged int4 model better than QLoRA followed by RTN int4: "
        f"{'met' if ok2 else 'MISSED'} ({l4q['val_loss']:.4f} vs {rtn['val_loss']:.4f}, "
        f"{100 * (l4q['val_loss'] / rtn['val_loss'] - 1):+.2f}%; against RTN with MSE-searched "
        f"clipping, {mse['val_loss']:.4f}: {100 * (l4q['val_loss'] / mse['val_loss'] - 1):+.2f}%).",
    ]


def write(args, log, rows, train_files, val_files, seconds) -> None:
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    steps, _, _ = log[-1]
    best = min(v for _, _, v in log)
    lines = [
        "# Fine-tuning a pretrained GPT: full, LoRA, QLoRA and L4Q (jaxq.lora)",
        "",
        f"- Date: {datetime.date.today()}; jax {jax.__version__}; Python {sys.version.split()[0]}",
        f"- Machine: {machine()}",
        f"- Model: GPT, {CONFIG.n_layers} layers, d_model {CONFIG.d_model}, {CONFIG.n_heads} "
        f"heads, seq {CONFIG.seq_len}, byte-level, tied readout; pretrained {steps} steps on "
        f"the first {PRETRAIN_BYTES // 1000} kB of the default corpus (best validation loss "
        f"{best:.4f} there).",
        f"- Fine-tuning data: {args.train_bytes // 1000} kB from {len(train_files)} other files "
        f"({train_files[0]} ... {train_files[-1]}); validation: {args.windows} windows of "
        f"{CONFIG.seq_len} tokens from {len(val_files)} further files ({val_files[0]} ... "
        f"{val_files[-1]}), none seen in pretraining or fine-tuning.",
        f"- Every method: {args.steps} steps, batch {args.batch} x {CONFIG.seq_len}, warm-up + "
        f"cosine; full fine-tuning peak lr {args.lr_full:g} (AdamW, float32 state), adapters "
        f"peak lr {args.lr:g}, rank {args.rank}, alpha {2 * args.rank}, on every block "
        "projection (q/k/v, attention out, MLP up/down); embeddings, LayerNorms, biases and "
        "the readout frozen. LoRA: float32 AdamW state; QLoRA and L4Q: jaxq.optim.adamw_8bit "
        "(tensors under 4096 elements keep float32 state); L4Q's steps (log s): Adam at "
        f"{args.l4q_step_lr_scale:g}x the adapters' lr (of 1x and 10x, tried on this data, "
        "10x was better).",
        "- Training state = parameters (the frozen base as stored) + trainable adapters (and "
        "L4Q's steps) + optimizer state, counted in real bytes.",
        f"- Command: `python benchmarks/lora.py` ({seconds / 60:.1f} min)",
        "",
        "| model | val loss | vs LoRA | frozen base | trainable | optimizer | training state "
        "| vs LoRA | train time |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    lo = _row("LoRA, float32", rows)

    def mib(b):
        return "" if b is None else f"{b / 2**20:.2f} MiB"

    for r in rows:
        s = r["state"] or {}
        ratio = "" if r["state_total"] is None else f"{r['state_total'] / lo['state_total']:.3f}x"
        vs = 100 * (r["val_loss"] / lo["val_loss"] - 1)
        lines.append(
            f"| {r['row']} | {r['val_loss']:.4f} | {vs:+.2f}%"
            f" | {mib(s.get('base'))} | {mib(s.get('trainable'))} | {mib(s.get('optimizer'))} | "
            f"{mib(r['state_total'])} | {ratio} | {r['seconds']:.0f} s |".replace("| 0 s |", "| |")
        )
    lines += ["", "Goals:", "", *goals(rows)]
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps(
        {"args": vars(args), "rows": rows, "train_files": train_files, "val_files": val_files,
         "pretraining": log, "seconds": seconds}, indent=1))  # fmt: skip
    print("\n".join(lines))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
