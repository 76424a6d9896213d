"""QLoRA / L4Q fine-tuning of a GPT over a frozen 4-bit base, merged into an int4 model.

1. Pretrain a small :class:`jaxq.models.GPT` on the first part of the corpus (the standard
   library's sources by default, or ``--corpus FILE``); ``--tiny`` skips this and adapts
   the freshly initialised model.
2. :func:`jaxq.lora.adapt` gives every block projection a rank-``r`` adapter over a packed
   base: NF4 (QLoRA), int4 with learned step sizes (L4Q), or the float kernel (LoRA).
3. Train the adapters only on the next part of the corpus:
   ``nnx.Optimizer(model, jaxq.optim.adamw_8bit(...), wrt=nnx.LoRAParam)``, wrapped in
   ``optax.apply_if_finite`` so a non-finite step is skipped instead of poisoning state.
4. :func:`jaxq.lora.merge` folds the adapters into the base and quantizes it to int4
   (L4Q: with its learned steps; QLoRA/LoRA: round-to-nearest), a plain serving model.

Prints the validation loss of the base, the adapted model and the merged int4 model, and
the bytes of the training state.

Usage:
    python examples/qlora_finetune.py --tiny                # seconds, on a CPU
    python examples/qlora_finetune.py --method l4q --steps 300 --pretrain-steps 1000
    python examples/qlora_finetune.py --corpus notes.txt --method qlora
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np
import optax
from flax import nnx

import jaxq
from jaxq import data, lora, optim, ptq
from jaxq.models import GPT, GPTConfig, cross_entropy, evaluate, train

BASES = {"qlora": lambda g: ptq.NF4(g), "l4q": lambda g: lora.L4Q(g), "lora": lambda g: lora.FLOAT}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--method", choices=sorted(BASES), default="qlora")
    ap.add_argument("--corpus", default=None, help="a text file (default: the stdlib sources)")
    ap.add_argument("--max-bytes", type=int, default=1_500_000)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--d-ff", type=int, default=None, help="MLP width (default 4 d_model)")
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--pretrain-steps", type=int, default=400, help="0: no pretraining")
    ap.add_argument("--steps", type=int, default=200, help="fine-tuning steps")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--group", type=int, default=64, help="4-bit group size along K")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--windows", type=int, default=256, help="validation windows")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tiny", action="store_true", help="a seconds-long run (smoke test)")
    args = ap.parse_args(argv)
    if args.tiny:
        # d_ff = d_model: fewer distinct layer shapes, so fewer compiled quantizers.
        args.max_bytes, args.d_model, args.layers, args.seq_len = 200_000, 64, 1, 32
        args.d_ff = 64
        args.pretrain_steps, args.steps, args.batch, args.windows = 0, 10, 8, 16
        args.rank, args.group = 4, 32
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    t0 = time.time()
    tokens = data.load_tokens(args.corpus, max_bytes=args.max_bytes)
    n = len(tokens)
    pre, tune, val = tokens[: n * 6 // 10], tokens[n * 6 // 10 : n * 9 // 10], tokens[n * 9 // 10 :]

    # 1. A pretrained model (a short run here; any trained jaxq.models.GPT will do).
    config = GPTConfig(d_model=args.d_model, n_heads=4, n_layers=args.layers,
                       seq_len=args.seq_len, d_ff=args.d_ff)  # fmt: skip
    if args.pretrain_steps:
        base = train(config, optax.adamw(3e-3), steps=args.pretrain_steps, seed=args.seed,
                     corpus=(pre, val), batch_size=args.batch, eval_windows=args.windows).model
    else:  # --tiny: the freshly initialised model stands in for a pretrained one
        base = GPT(config, rngs=nnx.Rngs(args.seed))

    # 2. Adapters over a packed base; the readout (tied to the embedding) is not a layer.
    rules = [jaxq.Rule(r"blocks/.*", recipe=BASES[args.method](args.group))]
    sample = data.batch(tune, jax.random.key(1), batch_size=2, seq_len=args.seq_len)[0]
    adapted = lora.adapt(base, None, rules, lora.LoRA(rank=args.rank, alpha=2.0 * args.rank),
                         calibration=[sample], key=jax.random.key(args.seed))  # fmt: skip
    model = adapted.model

    # 3. Train the adapters (and L4Q's steps): nothing else has gradients or optimizer state.
    schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, max(1, args.steps // 10),
                                                  args.steps, args.lr / 10)  # fmt: skip
    tx = optax.apply_if_finite(optim.adamw_8bit(schedule, weight_decay=0.0), 20)
    opt = nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)

    adapters_only = nnx.DiffState(0, nnx.LoRAParam)

    @nnx.jit
    def step(model, opt, x, y):
        loss, grads = nnx.value_and_grad(lambda m: cross_entropy(m(x), y),
                                         argnums=adapters_only)(model)  # fmt: skip
        opt.update(model, grads)
        return loss

    sample_batch = jax.jit(lambda k: data.batch(tune, k, batch_size=args.batch,
                                                seq_len=args.seq_len))  # fmt: skip
    key = jax.random.key(args.seed + 1)
    losses = [float(step(model, opt, *sample_batch(jax.random.fold_in(key, i))))
              for i in range(args.steps)]  # fmt: skip

    # 4. Merge into a plain int4 serving model (no adapters left).
    served = lora.merge(model, rules=[jaxq.Rule(r"blocks/.*", recipe=ptq.W4(args.group))]
                        if args.method != "l4q" else None)  # fmt: skip

    def score(m):
        return evaluate(m, val, max_windows=args.windows)

    state = {
        "frozen base": ptq.weight_bytes(nnx.state(model, nnx.Not(nnx.LoRAParam))),
        "adapters": ptq.weight_bytes(nnx.state(model, nnx.LoRAParam)),
        "optimizer": optim.state_nbytes(opt.opt_state),
    }
    result = {
        "method": args.method,
        "val_loss_base": score(base),
        "val_loss_adapted": score(model),
        "val_loss_merged_int4": score(served.model),
        "train_loss_first_last": (losses[0], float(np.mean(losses[-5:]))),
        "state_bytes": state,
        "served_bytes": ptq.weight_bytes(nnx.state(served.model)),
        "seconds": time.time() - t0,
    }
    print(f"{args.method}: {len(adapted.adapters)} adapted layers, rank {args.rank}, "
          f"{args.steps} steps")  # fmt: skip
    print("  training state: " + ", ".join(f"{k} {v / 1024:.1f} KiB" for k, v in state.items()))
    print(f"  serving state: {result['served_bytes'] / 1024:.1f} KiB ({result['seconds']:.0f} s)")
    print(f"RESULT qlora_finetune: {args.method} val loss base {result['val_loss_base']:.4f}, "
          f"adapted {result['val_loss_adapted']:.4f}, merged int4 "
          f"{result['val_loss_merged_int4']:.4f}; training state "
          f"{sum(state.values()) / 1024:.0f} KiB")  # fmt: skip
    return result


if __name__ == "__main__":
    main()
