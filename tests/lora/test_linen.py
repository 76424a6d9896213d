"""jaxq.lora on Flax Linen: adapters in the "lora" collection, the forward against a float64
reference, gradients for adapters only under jit, merging, and adapters that do not
match the module. (nn.scan over layers: test_scanned.py.)"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxq
from jaxq import lora, ptq

from . import reference as R

CFG = lora.LoRA(rank=4, alpha=8.0)
X = jax.random.normal(jax.random.key(1), (16, 128))


class MLP(nn.Module):
    hidden: int = 128

    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(self.hidden, name="up")(x))
        return nn.Dense(64, name="down")(h)


MODEL = MLP()
VARIABLES = MODEL.init(jax.random.key(0), X)


def _adapt(recipe, rules=None):
    rules = rules or [jaxq.Rule(".*", recipe=recipe)]
    return lora.adapt(MODEL, VARIABLES, rules, CFG, calibration=[X])


def _with_b(params, seed=2, scale=0.05):
    leaves = params["lora"]
    new = {name: {**node, "lora_b": scale * jax.random.normal(jax.random.key(seed + i),
                                                              node["lora_b"].shape)}
           for i, (name, node) in enumerate(leaves.items())}  # fmt: skip
    return {**params, "lora": new}


def _loss(lora_tree, params, model):
    y = model.apply({**params, "lora": lora_tree}, X)
    return jnp.mean((y - jnp.tanh(X[:, :64])) ** 2)


@pytest.mark.parametrize("recipe", [lora.FLOAT, ptq.NF4(64)], ids=["float", "nf4"])
def test_forward_equals_float64_reference_and_only_adapters_train(recipe):
    out = _adapt(recipe)
    assert sorted(out.params) == ["lora", "params"]
    assert jax.tree.map(jnp.shape, out.params["lora"]) == {
        "up": {"lora_a": (128, 4), "lora_b": (4, 128)},
        "down": {"lora_a": (128, 4), "lora_b": (4, 64)}}  # fmt: skip
    apply = jax.jit(out.model.apply)
    y0 = apply(out.params, X)
    if recipe is lora.FLOAT:
        base = MODEL.apply(VARIABLES, X)
    else:
        served = ptq.convert(MODEL, VARIABLES, [jaxq.Rule(".*", recipe=recipe)], calibration=[X])
        base = jax.jit(served.model.apply)(served.params, X)
        qw = out.params["params"]["up"]["kernel"]
        assert isinstance(qw, ptq.QuantizedWeight) and qw.weight.codes.shape == (1, 128, 64)
    np.testing.assert_array_equal(np.asarray(y0), np.asarray(base))
    params = _with_b(out.params)
    layers = []
    for name in ("up", "down"):
        k = params["params"][name]["kernel"]
        w = R.dequantize(k).T if isinstance(k, ptq.QuantizedWeight) else np.asarray(k, np.float64)
        node = params["lora"][name]
        layers.append((w, np.asarray(params["params"][name]["bias"], np.float64),
                       node["lora_a"], node["lora_b"]))  # fmt: skip
    np.testing.assert_allclose(np.asarray(apply(params, X)), R.lora_forward(X, layers, CFG.scale),
                               rtol=1e-5, atol=1e-5)  # fmt: skip
    # Gradients (under jit) for the "lora" tree only; the base is a constant.
    grads = jax.jit(jax.grad(_loss), static_argnums=2)(params["lora"], params, out.model)
    assert jax.tree.structure(grads) == jax.tree.structure(params["lora"])
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))


def test_l4q_learns_steps_and_merges_to_its_training_forward():
    out = _adapt(lora.L4Q(64))
    steps = out.params["lora"]["up"]["lora_log_steps"]
    assert steps.shape == (1, 128, 2, 1)
    grad = jax.jit(jax.value_and_grad(_loss), static_argnums=2)
    lr, params = 3e-2, out.params
    losses = []
    for _ in range(3):
        loss, g = grad(params["lora"], params, out.model)
        losses.append(float(loss))
        params = {**params, "lora": jax.tree.map(lambda p, d: p - lr * jnp.sign(d),
                                                  params["lora"], g)}  # fmt: skip
    assert losses[-1] < losses[0]
    assert float(jnp.abs(params["lora"]["up"]["lora_log_steps"] - steps).max()) > 0
    served = lora.merge(out.model, params)
    assert served.float_layers == ()
    for name in ("up", "down"):
        node = served.params["params"][name]
        assert isinstance(node["kernel"], ptq.QuantizedWeight)
        assert not any(k.startswith("lora") for k in node)
        np.testing.assert_allclose(np.asarray(node["kernel"].weight.scale)[..., None],
                                   np.exp(params["lora"][name]["lora_log_steps"]), rtol=1e-6)
    assert "lora" not in served.params
    np.testing.assert_allclose(np.asarray(jax.jit(served.model.apply)(served.params, X)),
                               np.asarray(jax.jit(out.model.apply)(params, X)), rtol=0,
                               atol=1e-6)  # fmt: skip


def test_qlora_merge_folds_the_adapters_into_the_base():
    out = _adapt(ptq.NF4(64))
    params = _with_b(out.params)
    y = jax.jit(out.model.apply)(params, X)
    served = lora.merge(out.model, params, rules=[jaxq.Rule(".*", recipe=lora.FLOAT)])
    assert served.float_layers == ("up", "down")  # deq(NF4) + ΔW, kept in float
    node = served.params["params"]["up"]
    a, b = (np.asarray(params["lora"]["up"][k], np.float64) for k in ("lora_a", "lora_b"))
    want = R.dequantize(out.params["params"]["up"]["kernel"]).T + CFG.scale * a @ b
    np.testing.assert_allclose(np.asarray(node["kernel"]), want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(served.model.apply(served.params, X)), np.asarray(y),
                               rtol=1e-5, atol=1e-5)  # fmt: skip
    rtn = lora.merge(out.model, params, rules=[jaxq.Rule(".*", recipe=ptq.W4(128))])
    assert rtn.params["params"]["up"]["kernel"].weight.fmt.name == "int4"


def test_einsum_and_dense_general_layers_add_the_folded_delta():
    """Kernels with several axes: y = x (W + ΔW), ΔW = (alpha/r) A B reshaped."""

    class Attn(nn.Module):
        @nn.compact
        def __call__(self, x):
            q = nn.Einsum((128, 4, 16), "btd,dhk->bthk", name="q")(x)
            return nn.DenseGeneral(32, axis=(-2, -1), name="o")(q)

    x = X.reshape(2, 8, 128)
    model = Attn()
    v = model.init(jax.random.key(0), x)
    out = lora.adapt(model, v, [jaxq.Rule(".*", recipe=lora.FLOAT)], CFG, calibration=[x])
    assert [(i.path, i.k, i.n) for i in out.adapters] == [("q", 128, 64), ("o", 64, 32)]
    np.testing.assert_array_equal(np.asarray(out.model.apply(out.params, x)),
                                  np.asarray(model.apply(v, x)))  # fmt: skip
    params = _with_b(out.params)
    w = {}
    for name in ("q", "o"):
        k = np.asarray(params["params"][name]["kernel"], np.float64)
        node = params["lora"][name]
        a, b = np.asarray(node["lora_a"], np.float64), np.asarray(node["lora_b"], np.float64)
        w[name] = k + CFG.scale * (a @ b).reshape(k.shape)
    h = np.einsum("btd,dhk->bthk", np.asarray(x, np.float64), w["q"])
    h = h + np.asarray(params["params"]["q"]["bias"], np.float64)
    want = np.einsum("bthk,hkd->btd", h, w["o"]) + np.asarray(params["params"]["o"]["bias"])
    np.testing.assert_allclose(np.asarray(out.model.apply(params, x)), want, rtol=1e-5,
                               atol=1e-5)  # fmt: skip


def test_adapters_made_with_other_rules_are_an_error():
    full = _adapt(ptq.NF4(64))
    only_up = _adapt(None, [jaxq.Rule("up", recipe=ptq.NF4(64)), jaxq.Rule(".*", recipe=None)])
    mixed = {**only_up.params, "lora": full.params["lora"]}
    with pytest.raises(ValueError, match=r"'down' has adapters the module was not adapted with"):
        only_up.model.apply(mixed, X)
    with pytest.raises(ValueError, match=r"rules differ.*'down' has no adapter, but rule"):
        lora.merge(only_up.model, only_up.params, rules=[jaxq.Rule(".*", recipe=ptq.W4(128))])
    with pytest.raises(ValueError, match=r"'up'.*rank 129"):
        lora.adapt(MODEL, VARIABLES, [jaxq.Rule(".*", recipe=lora.FLOAT)], lora.LoRA(rank=129),
                   calibration=[X])  # fmt: skip
    with pytest.raises(ValueError, match="need calibration"):
        lora.adapt(MODEL, VARIABLES, [jaxq.Rule(".*", recipe=lora.FLOAT)])

    class ConvNet(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(4)(nn.Conv(8, (3, 3), name="conv")(x).mean(axis=(1, 2)))

    img = jnp.ones((1, 8, 8, 3))
    abstract = jax.eval_shape(ConvNet().init, jax.random.key(0), img)
    with pytest.raises(ValueError, match="'conv'.*conv layers have no adapter path"):
        lora.adapt(ConvNet(), abstract, [jaxq.Rule(".*", recipe=lora.FLOAT)], calibration=[img])
