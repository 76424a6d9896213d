"""Mixture-of-experts layers written as Flax users write them, wrapped through the
``ragged_dot`` slot: top-1 routing, tokens sorted by expert, grouped matmuls."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxq
from jaxq import recipes as R

D, HIDDEN, EXPERTS = 64, 128, 4


def _route(logits):
    expert = jnp.argmax(logits, axis=-1)
    order = jnp.argsort(expert)
    sizes = jnp.bincount(expert, length=logits.shape[-1]).astype(jnp.int32)
    gate = jax.nn.softmax(logits, axis=-1)[jnp.arange(logits.shape[0]), expert]
    return order, sizes, gate


class NNXMoE(nnx.Module):
    def __init__(self, *, rngs, ragged_dot=jax.lax.ragged_dot):
        init = nnx.initializers.lecun_normal()
        self.router = nnx.Linear(D, EXPERTS, rngs=rngs)
        self.w_in = nnx.Param(init(rngs.params(), (EXPERTS, D, HIDDEN)))
        self.w_out = nnx.Param(init(rngs.params(), (EXPERTS, HIDDEN, D)))
        self.ragged_dot = ragged_dot

    def __call__(self, x):
        order, sizes, gate = _route(self.router(x))
        h = nnx.gelu(self.ragged_dot(x[order], self.w_in[...], sizes))
        y = self.ragged_dot(h, self.w_out[...], sizes)
        return jnp.zeros_like(x).at[order].set(y) * gate[:, None]


class LinenMoE(nn.Module):
    ragged_dot: object = jax.lax.ragged_dot

    @nn.compact
    def __call__(self, x):
        order, sizes, gate = _route(nn.Dense(EXPERTS, name="router")(x))
        init = nn.initializers.lecun_normal()
        w_in = self.param("w_in", init, (EXPERTS, D, HIDDEN))
        w_out = self.param("w_out", init, (EXPERTS, HIDDEN, D))
        h = nn.gelu(self.ragged_dot(x[order], w_in, sizes))
        y = self.ragged_dot(h, w_out, sizes)
        return jnp.zeros_like(x).at[order].set(y) * gate[:, None]


X = jax.random.normal(jax.random.key(1), (48, D))
RULES = [jaxq.Rule(".*router", recipe=None),
         jaxq.Rule(".*", op="ragged_dot", recipe=R.FP8Current())]  # fmt: skip


def _rel(a, b):
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def test_nnx_moe_experts_are_quantized_through_the_ragged_dot_slot():
    model = NNXMoE(rngs=nnx.Rngs(0))
    q = jaxq.quantize_model(model, RULES)
    ops = {p: op for p, _, op in jaxq.wrapping.layers(q)}
    assert ops == {"": "ragged_dot", "router": "dot_general"}
    assert jaxq.unused_rules(q, RULES) == []
    y0, y = model(X), q(X)
    assert 1e-3 < _rel(y, y0) < 0.1

    def loss(m):
        return jnp.sum(m(X) ** 2)

    g = nnx.grad(loss)(q)
    grads = jax.tree.leaves(nnx.state(g, nnx.Param))
    assert all(np.isfinite(a).all() for a in grads)
    assert float(jnp.abs(nnx.state(g, nnx.Param)["w_in"][...]).sum()) > 0


def test_linen_moe_experts_are_quantized_through_the_ragged_dot_slot():
    model = LinenMoE()
    v = model.init(jax.random.key(0), X)
    q = jaxq.quantize_model(model, RULES)
    y0, y = model.apply(v, X), q.apply(v, X)
    assert 1e-3 < _rel(y, y0) < 0.1
    g = jax.grad(lambda p: jnp.sum(q.apply({"params": p}, X) ** 2))(v["params"])
    assert all(np.isfinite(a).all() for a in jax.tree.leaves(g))


def test_block_granularity_on_experts_is_a_wrap_time_error():
    with pytest.raises(ValueError, match="ragged_dot"):
        jaxq.quantize_model(NNXMoE(rngs=nnx.Rngs(0)),
                            [jaxq.Rule(".*", op="ragged_dot", recipe=R.MXFP8())])  # fmt: skip
