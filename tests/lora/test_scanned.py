"""jaxq.lora on layers stacked for scans: a Gemma-style NNX decoder (nnx.vmap + nnx.scan,
nnx.Einsum attention) and a Linen transformer under nn.scan (DenseGeneral attention).

Marked ``sweep`` (long: each runs the model eagerly to convert and merge it), so the
newest-JAX pass of ``make test`` leaves them to the first pass."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from wrapping.gemma_style import Decoder
from wrapping.linen_models import TransformerLM

import jaxq
from jaxq import lora, ptq

pytestmark = pytest.mark.sweep

CFG = lora.LoRA(rank=4, alpha=8.0)
TOKENS = jax.random.randint(jax.random.key(1), (2, 16), 0, 256)


def test_scanned_gemma_decoder_with_einsum_layers():
    model = Decoder(rngs=nnx.Rngs(0))
    rules = [jaxq.Rule(r".*mlp/.*", recipe=lora.L4Q(64)),
             jaxq.Rule(r".*attn/.*", recipe=ptq.NF4(64))]  # fmt: skip
    out = lora.adapt(model, None, rules, CFG, calibration=[TOKENS])
    m = out.model
    kinds = {i.path: (i.kind, i.stack, i.k, i.n) for i in out.adapters}
    assert kinds["blocks/attn/q"] == ("qlora", (2,), 64, 64)  # "btd,dhk->bthk"
    assert kinds["blocks/attn/o"] == ("qlora", (2,), 64, 64)  # "bthk,hkd->btd"
    assert kinds["blocks/mlp/down"] == ("l4q", (2,), 128, 64)
    fwd = nnx.jit(lambda m, t: m(t))
    y0 = fwd(m, TOKENS)
    # Stacked adapters, sliced by nnx.scan like the weights; give them values.
    for i, (_, layer, _) in enumerate(jaxq.wrapping.layers(m)):
        b = layer.lora_b.get_value()
        assert b.shape[0] == 2 and layer.lora_a.get_value().shape[0] == 2
        layer.lora_b.set_value(0.05 * jax.random.normal(jax.random.key(i), b.shape))
    y = fwd(m, TOKENS)
    assert float(jnp.max(jnp.abs(y - y0))) > 1e-3
    served = lora.merge(m, rules=[jaxq.Rule(r".*mlp/.*", recipe=lora.L4Q(64)),
                                  jaxq.Rule(r".*attn/.*", recipe=lora.FLOAT)])  # fmt: skip
    assert set(served.float_layers) == {f"blocks/attn/{p}" for p in "qkvo"}
    assert not jax.tree.leaves(nnx.state(served.model, nnx.LoRAParam))
    # L4Q layers serve their training forward, attention keeps deq(NF4) + ΔW in float.
    np.testing.assert_allclose(np.asarray(fwd(served.model, TOKENS)), np.asarray(y),
                               rtol=0, atol=2e-4)  # fmt: skip


def test_linen_transformer_under_scan():
    model = TransformerLM()
    variables = model.init(jax.random.key(0), TOKENS)
    rules = [jaxq.Rule("head", recipe=None), jaxq.Rule(r".*Dense_\d", recipe=lora.L4Q(64)),
             jaxq.Rule(".*", recipe=ptq.NF4(64))]  # fmt: skip
    out = lora.adapt(model, variables, rules, CFG, calibration=[TOKENS])
    shapes = jax.tree.map(jnp.shape, out.params["lora"]["layers"])
    assert shapes["Dense_1"] == {"lora_a": (2, 256, 4), "lora_b": (2, 4, 64),
                                 "lora_log_steps": (2, 1, 64, 4, 1)}  # fmt: skip
    assert shapes["MultiHeadDotProductAttention_0"]["out"]["lora_a"] == (2, 64, 4)
    assert "head" not in out.params["lora"]
    apply = jax.jit(out.model.apply)

    def loss(lora_tree, params):
        logits = out.model.apply({**params, "lora": lora_tree}, TOKENS)
        return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(
            logits, TOKENS[..., None], -1)[..., 0])  # fmt: skip

    grads = jax.jit(jax.grad(loss))(out.params["lora"], out.params)
    assert jax.tree.structure(grads) == jax.tree.structure(out.params["lora"])
    params = {**out.params, "lora": jax.tree.map(lambda p, g: p - 1e-2 * jnp.sign(g),
                                                  out.params["lora"], grads)}  # fmt: skip
    y = apply(params, TOKENS)
    served = lora.merge(out.model, params, rules=[*rules[:2], jaxq.Rule(".*", recipe=lora.FLOAT)])
    attn = "layers/MultiHeadDotProductAttention_0/"
    assert set(served.float_layers) == {"head", *(attn + p for p in ("query", "key", "value",
                                                                      "out"))}  # fmt: skip
    assert "lora" not in served.params
    kernel = served.params["params"]["layers"]["Dense_0"]["kernel"]
    assert isinstance(kernel, ptq.QuantizedWeight) and kernel.weight.codes.shape == (2, 1, 256, 32)
    # L4Q layers serve their training forward, attention keeps deq(NF4) + ΔW in float.
    ys = jax.jit(served.model.apply)(served.params, TOKENS)
    np.testing.assert_allclose(np.asarray(ys), np.asarray(y), rtol=0, atol=2e-4)
