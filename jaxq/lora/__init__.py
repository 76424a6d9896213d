"""LoRA, QLoRA and L4Q fine-tuning over a frozen (packed) base, for Flax NNX and Linen.

:func:`adapt` gives the layers that :class:`jaxq.Rule` regexes select (first match wins)
a low-rank adapter ``A (K × r)``, ``B (r × N)`` over a frozen base ``W_0``:

* LoRA (rule recipe :data:`FLOAT`) and QLoRA (a weight-only scheme such as
  ``jaxq.ptq.NF4(64)`` or ``W4(128)``; the base stored packed by :func:`jaxq.ptq.convert`,
  two 4-bit codes per byte):

  .. math::

      y = x \\cdot \\mathrm{deq}(W_0) + \\frac{\\alpha}{r}\\, \\mathrm{dropout}(x)\\, A B

* L4Q (rule recipe :func:`L4Q`): the base's learned-step quantizer applied to the sum,
  with the steps ``s`` trained jointly (LSQ gradient, :func:`jaxq.lsq_quant`):

  .. math::

      y = x \\cdot Q_s\\big(W_0 + \\tfrac{\\alpha}{r} A B\\big),\\qquad
      Q_s(w) = s \\cdot \\mathrm{round}(\\mathrm{clip}(w / s, Q_n, Q_p))

``A`` starts at Kaiming-uniform noise and ``B`` at zero, so the adapted model starts as
its base. Only adapters (and L4Q's steps) are trainable: NNX holds them as
``nnx.LoRAParam`` (``nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)``), Linen in the
``"lora"`` collection (differentiate ``variables["lora"]`` only). :func:`merge` folds them
into the base and quantizes it (L4Q with its learned steps) into a plain serving model.

Example:
    >>> import jax, jax.numpy as jnp, optax, jaxq
    >>> from flax import nnx
    >>> x = jax.random.normal(jax.random.key(0), (8, 64))
    >>> out = jaxq.lora.adapt(nnx.Linear(64, 32, rngs=nnx.Rngs(0)), None,
    ...                       [jaxq.Rule(".*", recipe=jaxq.lora.L4Q(32))],   # int4, g32
    ...                       jaxq.lora.LoRA(rank=4), calibration=[x])
    >>> model = out.model
    >>> tx = jaxq.lora.optimizer(optax.adam(1e-2), steps=optax.adam(1e-1))
    >>> opt = nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)   # adapters and steps only
    >>> @nnx.jit
    ... def step(model, opt):
    ...     loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - 1.0) ** 2),
    ...                                      argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
    ...     opt.update(model, grads)
    ...     return loss
    >>> losses = [float(step(model, opt)) for _ in range(3)]
    >>> losses[2] < losses[0]
    True
    >>> served = jaxq.lora.merge(model)   # int4 codes, the learned steps as scales
    >>> served.model.kernel.get_value().weight.codes.dtype, hasattr(served.model, "lora_a")
    (dtype('uint8'), False)
    >>> bool(jnp.allclose(served.model(x), model(x), atol=1e-5))
    True
"""

from jaxq.lora.api import Adapted, adapt, adapters, merge, optimizer
from jaxq.lora.core import FLOAT, L4Q, AdapterInfo, L4QRecipe, LoRA
from jaxq.lora.linen import COLLECTION
from jaxq.lora.nnx import LearnedStep

__all__ = ["adapt", "merge", "adapters", "optimizer", "Adapted", "AdapterInfo", "LoRA", "FLOAT",
           "L4Q", "L4QRecipe", "LearnedStep", "COLLECTION"]  # fmt: skip
