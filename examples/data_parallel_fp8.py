"""Data-parallel FP8 training over a device mesh: the batch is sharded over devices, the
parameters and recipe state are replicated, and every device quantizes with the same,
global, scale.

What it shows:

1. A ``jax.sharding.Mesh`` over the devices (eight virtual CPU devices when there is no
   accelerator: ``--xla_force_host_platform_device_count=8``, set before JAX starts), a
   batch split along its first axis (``PartitionSpec("data")``), the model's state
   replicated (``PartitionSpec()``). Nothing else changes: ``jit`` inserts the collectives.
2. An NNX model wrapped with ``jaxq.quantize_model`` and ``jaxq.recipes.FP8Delayed``.
   Under ``jit`` the amax each FP8 op records is the maximum over the *global* batch, so
   the histories (and hence the scales) are identical on every device, even when one
   device's shard holds an outlier the others never see.
3. The sharded step computes what the same step computes on one device.

Run:
    python examples/data_parallel_fp8.py --tiny
    python examples/data_parallel_fp8.py
"""

from __future__ import annotations

import os

# Eight host (CPU) devices, unless the caller chose a count. Must be set before JAX starts;
# it only affects the CPU platform, so accelerators are used as they are.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_force_host_platform_device_count=8").strip()

import argparse  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jaxq  # noqa: E402


class MLP(nnx.Module):
    def __init__(self, d_in, d_hidden, d_out, *, rngs):
        self.up = nnx.Linear(d_in, d_hidden, rngs=rngs)
        self.mid = nnx.Linear(d_hidden, d_hidden, rngs=rngs)
        self.out = nnx.Linear(d_hidden, d_out, rngs=rngs)

    def __call__(self, x):
        return self.out(nnx.gelu(self.mid(nnx.gelu(self.up(x)))))


def make_data(key, n, d_in, d_out):
    """A regression task: targets from a fixed random two-layer teacher network."""
    k1, k2, k3 = jax.random.split(key, 3)
    x = jax.random.normal(k1, (n, d_in))
    w = jax.random.normal(k2, (d_in, 64)) / np.sqrt(d_in)
    v = jax.random.normal(k3, (64, d_out)) / 8.0
    return x, jnp.tanh(x @ w) @ v


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="a few steps of a small model")
    args = ap.parse_args(argv)
    d_in, d_hidden, d_out = 64, (128 if args.tiny else 512), 16
    steps, per_device = (5, 8) if args.tiny else (300, 32)
    t0 = time.perf_counter()

    devices = jax.devices()[:8]
    n = len(devices)
    mesh = Mesh(np.array(devices), ("data",))
    batch_sharding = NamedSharding(mesh, P("data"))  # rows split over the devices
    replicated = NamedSharding(mesh, P())  # a full copy on every device
    print(f"{n} {devices[0].platform} devices, mesh {dict(mesh.shape)}; global batch "
          f"{n * per_device} = {n} x {per_device}")

    recipe = jaxq.recipes.FP8Delayed(history_length=16)
    qmodel = jaxq.quantize_model(MLP(d_in, d_hidden, d_out, rngs=nnx.Rngs(0)),
                                 [jaxq.Rule(".*", recipe=recipe)])  # fmt: skip
    single = nnx.clone(qmodel)  # the same model, trained below on one device for comparison

    optimizer = nnx.Optimizer(qmodel, optax.adam(1e-3), wrt=nnx.Param)
    single_opt = nnx.Optimizer(single, optax.adam(1e-3), wrt=nnx.Param)
    # Replicate parameters, recipe state and optimizer state over the mesh.
    for obj in (qmodel, optimizer):
        nnx.update(obj, jax.device_put(nnx.state(obj), replicated))

    def loss_fn(model, x, y):
        return jnp.mean((model(x) - y) ** 2)

    @nnx.jit
    def train_step(model, optimizer, x, y):
        loss, grads = jaxq.wrapping.value_and_grad(loss_fn)(model, x, y)  # updates histories
        optimizer.update(model, grads)
        return loss

    key = jax.random.key(1)
    for step in range(steps):
        x, y = make_data(jax.random.fold_in(key, step), n * per_device, d_in, d_out)
        if step == 0:
            x = x.at[0].multiply(25.0)  # an outlier row: it lands on the first device only
        xs, ys = jax.device_put((x, y), batch_sharding)
        loss = train_step(qmodel, optimizer, xs, ys)
        loss_1 = train_step(single, single_opt, x, y)  # the unsharded batch, one device
        if step % max(1, steps // 10) == 0 or step == steps - 1:
            print(f"step {step:3d}  loss {float(loss):.6f}  (one device: {float(loss_1):.6f})")
        if step == 0:
            local = [float(np.abs(np.asarray(s.data)).max()) for s in xs.addressable_shards]
            hist = qmodel.up.jaxq_state.get_value().lhs_history
            recorded = [float(s.data[0]) for s in hist.addressable_shards]
            print(f"  max |x| of each device's shard: {', '.join(f'{v:.2f}' for v in local)}")
            print(f"  amax recorded for up's input, on each device: "
                  f"{', '.join(f'{v:.2f}' for v in recorded)} ({hist.sharding.spec}: replicated)")
            assert all(r == max(local) for r in recorded)  # the global maximum, everywhere
            # The first step is the one-device step up to the order of float32 sums: the
            # same loss and the same amaxes, output gradients (backward pass) included.
            grad_hist = qmodel.out.jaxq_state.get_value().grad_history[0]
            single_hist = single.out.jaxq_state.get_value().grad_history[0]
            np.testing.assert_allclose(float(loss), float(loss_1), rtol=1e-5)
            np.testing.assert_allclose(float(grad_hist), float(single_hist), rtol=1e-5)
            print(f"  amax of out's output gradient: {float(grad_hist):.4e} (one device: "
                  f"{float(single_hist):.4e})")
    # Later steps drift apart slowly: another summation order can flip an FP8 rounding.
    print(f"RESULT data_parallel_fp8: {n} devices, final loss {float(loss):.6f} (one device "
          f"{float(loss_1):.6f}), amax global and replicated; {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
