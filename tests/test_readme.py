"""The README's quickstart runs as written (with a small model and batch supplied)."""

import re
from pathlib import Path

import jax
import numpy as np
import optax
from flax import nnx

from jaxq.models import GPT, GPTConfig

README = Path(__file__).parents[1] / "README.md"


def test_quickstart_trains_in_fp8_and_serves_in_int4():
    code = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    model = GPT(GPTConfig(d_model=128, n_heads=2, n_layers=1, seq_len=16), rngs=nnx.Rngs(0))
    x = jax.random.randint(jax.random.key(1), (4, 16), 0, 256)

    def loss_fn(m, x, y):
        return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()

    scope = {"model": model, "x": x, "loss_fn": loss_fn}
    exec(compile(code + "\nloss = train_step(qmodel, optimizer, x, x)\n", str(README), "exec"),
         scope)  # fmt: skip
    assert np.isfinite(float(scope["loss"]))
    assert scope["logits"].shape == (4, 16, 256)
    assert scope["served"].float_layers == ()
    # The FP8 state moved: the amax histories hold what the step observed.
    hist = [np.asarray(v) for v in jax.tree.leaves(nnx.state(scope["qmodel"], nnx.Not(nnx.Param)))
            if np.asarray(v).dtype == np.float32]
    assert any(np.any(h > 0) for h in hist)
