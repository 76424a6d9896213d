"""jaxq.lora on Flax NNX: the LoRA/QLoRA forward against a float64 reference, frozen
packed bases, gradients and optimizer state for adapters only, L4Q steps and merging,
dropout, and bad input. (A scanned Gemma-style decoder: test_scanned.py.)"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxq
from jaxq import lora, ptq
from jaxq.ptq import serving as S

from . import reference as R

D, H, OUT = 128, 128, 64
CFG = lora.LoRA(rank=4, alpha=8.0)
X = jax.random.normal(jax.random.key(1), (16, D))
Y = jnp.tanh(X[:, :OUT])
fwd = nnx.jit(lambda m, x: m(x))


def _mlp(seed=0):
    rngs = nnx.Rngs(seed)
    return nnx.Sequential(nnx.Linear(D, H, rngs=rngs), nnx.relu, nnx.Linear(H, OUT, rngs=rngs))


def _layers(model):
    return [layer for _, layer, _ in jaxq.wrapping.layers(model)]


@functools.cache
def _adapted(recipe):
    return lora.adapt(_mlp(), None, [jaxq.Rule(".*", recipe=recipe)], CFG, calibration=[X])


def adapted(recipe):
    """A fresh copy of the MLP adapted under ``Rule(".*", recipe)``."""
    return nnx.clone(_adapted(recipe).model)


def _set_b(model, seed=2, scale=0.05):
    """Random nonzero B (a fresh adapter's is zero), so the adapter's term shows."""
    for i, layer in enumerate(_layers(model)):
        b = layer.lora_b.get_value()
        layer.lora_b.set_value(scale * jax.random.normal(jax.random.key(seed + i), b.shape))


def _base_kernel(layer):
    """The frozen base as the reference sees it: (K, N) float64."""
    v = vars(layer)["kernel"]
    if isinstance(v, ptq.PackedKernel):
        return R.dequantize(v.get_value()).T
    return np.asarray(v.get_value(), np.float64)


def _reference(model, x):
    layers = [(_base_kernel(m), np.asarray(m.bias.get_value(), np.float64),
               m.lora_a.get_value(), m.lora_b.get_value()) for m in _layers(model)]  # fmt: skip
    return R.lora_forward(x, layers, CFG.scale)


def _step(loss_fn):
    @nnx.jit
    def step(m, opt, x, y):
        loss, g = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))(m, x, y)
        opt.update(m, g)
        return loss, g

    return step


def _mse(m, x, y):
    return jnp.mean((m(x) - y) ** 2)


@pytest.mark.parametrize("recipe", [lora.FLOAT, ptq.NF4(64)], ids=["float", "nf4"])
def test_forward_equals_float64_reference_and_starts_at_the_base(recipe):
    m = adapted(recipe)
    y0 = fwd(m, X)
    if recipe is lora.FLOAT:
        base = fwd(_mlp(), X)
    else:  # the packed base alone: jaxq.ptq.convert's serving model
        base = fwd(ptq.convert(_mlp(), None, [jaxq.Rule(".*", recipe=recipe)],
                               calibration=[X]).model, X)  # fmt: skip
    np.testing.assert_array_equal(np.asarray(y0), np.asarray(base))  # B = 0: exactly the base
    _set_b(m)
    y = fwd(m, X)
    np.testing.assert_allclose(np.asarray(y), _reference(m, X), rtol=1e-5, atol=1e-5)
    assert float(jnp.max(jnp.abs(y - y0))) > 1e-2  # the adapter's term is there


@pytest.mark.parametrize("recipe,bits", [(ptq.NF4(64), 4 + 32 / 64), (ptq.W4(128), 4 + 32 / 128)],
                         ids=["nf4", "int4"])  # fmt: skip
def test_base_is_packed_and_frozen(recipe, bits):
    m = adapted(recipe)
    for layer in _layers(m):
        qw = vars(layer)["kernel"].get_value()
        assert isinstance(vars(layer)["kernel"], ptq.PackedKernel)  # a Variable, not a Param
        k, n = qw.kernel_shape
        assert qw.weight.codes.dtype == jnp.uint8 and qw.weight.codes.shape == (1, n, k // 2)
        assert ptq.weight_bytes(qw) == n * k * bits / 8
        assert layer.lora_a.get_value().shape == (k, 4) and layer.lora_b.get_value().shape == (4, n)
    names = {str(p[-1]) for p, _ in nnx.to_flat_state(nnx.state(m, nnx.LoRAParam))}
    assert names == {"lora_a", "lora_b"}  # the trainable state: adapters only


def test_train_step_with_8bit_state_for_adapters_only_under_jit():
    m = adapted(ptq.NF4(64))
    before = jax.tree.map(np.array, nnx.state(m, nnx.Not(nnx.LoRAParam)))
    tx = optax.apply_if_finite(jaxq.optim.adamw_8bit(1e-2, weight_decay=0.0), 10)
    opt = nnx.Optimizer(m, tx, wrt=nnx.LoRAParam)
    # Optimizer state exists for the adapters only: two moments per adapter element.
    adapter_elems = sum(a.size for a in jax.tree.leaves(nnx.state(m, nnx.LoRAParam)))
    moments = [a for a in jax.tree.leaves(nnx.state(opt)) if getattr(a, "ndim", 0) >= 2]
    assert 0 < sum(a.size for a in moments) <= 2 * adapter_elems
    step = _step(_mse)
    loss, grads = step(m, opt, X, Y)
    flat = dict(nnx.to_flat_state(grads))
    assert {str(p[-1]) for p in flat} == {"lora_a", "lora_b"}  # no gradient for the base
    assert all(float(jnp.abs(g.get_value()).max()) > 0 for p, g in flat.items()
               if p[-1] == "lora_b")  # fmt: skip
    losses = [float(loss)] + [float(step(m, opt, X, Y)[0]) for _ in range(3)]
    assert losses[-1] < losses[0]
    after = jax.tree.map(np.array, nnx.state(m, nnx.Not(nnx.LoRAParam)))
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True):
        np.testing.assert_array_equal(a, b)  # the base never moves
    # A non-finite batch is skipped: adapters and optimizer state stay as they were.
    adapters = jax.tree.map(np.array, nnx.state(m, nnx.LoRAParam))
    assert np.isnan(float(step(m, opt, X.at[0, 0].set(jnp.nan), Y)[0]))
    for a, b in zip(jax.tree.leaves(adapters), jax.tree.leaves(nnx.state(m, nnx.LoRAParam)),
                    strict=True):  # fmt: skip
        np.testing.assert_array_equal(a, np.asarray(b))
    assert np.isfinite(float(step(m, opt, X, Y)[0]))


@pytest.fixture(scope="module")
def l4q_trained():
    """The MLP adapted with L4Q (int4, groups of 64), trained five Adam steps."""
    m = adapted(lora.L4Q(64))
    y0 = fwd(m, X)
    steps0 = [np.array(layer.lora_log_steps.get_value()) for layer in _layers(m)]
    tx = lora.optimizer(optax.adam(1e-2), steps=optax.adam(3e-2))
    opt = nnx.Optimizer(m, tx, wrt=nnx.LoRAParam)
    step = _step(_mse)
    losses, grads = [], None
    for _ in range(5):
        loss, grads = step(m, opt, X, Y)
        losses.append(float(loss))
    return m, y0, steps0, losses, grads


def test_l4q_starts_at_the_rtn_base_and_learns_its_steps(l4q_trained):
    m, y0, steps0, losses, grads = l4q_trained
    base = ptq.convert(_mlp(), None, [jaxq.Rule(".*", recipe=ptq.W4(64))], calibration=[X])
    np.testing.assert_allclose(np.asarray(y0), np.asarray(fwd(base.model, X)), rtol=0, atol=1e-6)
    assert losses[-1] < losses[0]
    flat = dict(nnx.to_flat_state(grads))
    assert {str(p[-1]) for p in flat} == {"lora_a", "lora_b", "lora_log_steps"}
    for layer, s0 in zip(_layers(m), steps0, strict=True):
        s = np.asarray(layer.lora_log_steps.get_value())
        assert s.shape == s0.shape == (1, layer.jaxq_lora.n, layer.jaxq_lora.k // 64, 1)
        assert np.mean(s != s0) > 0.5  # the steps moved
        assert isinstance(layer.lora_log_steps, lora.LearnedStep)


def test_l4q_merge_requantizes_with_the_learned_steps(l4q_trained):
    m = l4q_trained[0]
    served = lora.merge(m)
    assert served.float_layers == ()
    for src, dst in zip(_layers(m), _layers(served.model), strict=True):
        # Reference: W0 (the packed base) + (alpha/r) A B in float64, on the learned grid.
        w = R.dequantize(vars(src)["kernel"].get_value())  # (N, K)
        a, b = (np.asarray(v.get_value(), np.float64) for v in (src.lora_a, src.lora_b))
        w = w + CFG.scale * (a @ b).T
        step = np.exp(np.asarray(src.lora_log_steps.get_value(), np.float64))[0, ..., 0]
        want = R.lsq_codes(w, step)  # steps (N, K/64), learned as log s
        qw = vars(dst)["kernel"].get_value()
        got = R.decode(R.unpack4(np.asarray(qw.weight.codes)[0], w.shape[1]), qw.weight.fmt)
        assert np.mean(got != want) < 1e-3 and np.abs(got - want).max() <= 1  # float32 ties
        np.testing.assert_allclose(np.asarray(qw.weight.scale)[0], step, rtol=1e-6)
        # A plain serving layer: packed codes, no adapter, no learned step left.
        assert S.is_serving(dst) and qw.weight.codes.dtype == jnp.uint8
        assert not any(name.startswith("lora_") for name in vars(dst))
    assert not jax.tree.leaves(nnx.state(served.model, nnx.LoRAParam))
    # Serving computes what L4Q trained.
    np.testing.assert_allclose(np.asarray(fwd(served.model, X)), np.asarray(fwd(m, X)),
                               rtol=0, atol=1e-6)  # fmt: skip


@pytest.mark.parametrize("base", [ptq.NF4(64), lora.FLOAT], ids=["nf4", "float"])
def test_l4q_over_an_nf4_or_float_base(base):
    """The steps start at the RTN scales of W0 (so training starts from RTN int4 of the
    stored base), and the merge serves the training forward."""
    m = adapted(lora.L4Q(64, base=base))
    w0 = []
    for layer in _layers(m):
        qw = vars(layer)["kernel"].get_value()
        packed = base is not lora.FLOAT
        assert isinstance(qw.weight, jaxq.QArray) == packed
        assert (qw.weight.fmt.name if packed else qw.weight.dtype) == ("nf4" if packed
                                                                         else jnp.float32)
        w0.append(_base_kernel(layer) if packed else
                  np.asarray(qw.weight, np.float64)[0].T)  # fmt: skip
    ref_model = _mlp()  # the float model with W0 as its kernels, converted by RTN int4 g64
    for layer, w in zip(_layers(ref_model), w0, strict=True):
        layer.kernel.set_value(jnp.asarray(w, jnp.float32))
    rtn = ptq.convert(ref_model, None, [jaxq.Rule(".*", recipe=ptq.W4(64))], calibration=[X])
    np.testing.assert_allclose(np.asarray(fwd(m, X)), np.asarray(fwd(rtn.model, X)), rtol=0,
                               atol=1e-5)  # fmt: skip
    _set_b(m)
    served = lora.merge(m)
    assert all(vars(layer)["kernel"].get_value().weight.fmt.name == "int4"
               for layer in _layers(served.model))  # fmt: skip
    np.testing.assert_allclose(np.asarray(fwd(served.model, X)), np.asarray(fwd(m, X)), rtol=0,
                               atol=1e-5)  # fmt: skip


def test_qlora_merge_then_rtn_int4_equals_converting_the_merged_float_model():
    m = adapted(ptq.NF4(64))
    _set_b(m)
    rtn = [jaxq.Rule(".*", recipe=ptq.W4(128))]
    served = lora.merge(m, rules=rtn)
    # Reference: the float model whose kernels are deq(NF4) + (alpha/r) A B, converted by RTN.
    merged = _mlp()
    for layer, src in zip(_layers(merged), _layers(m), strict=True):
        a, b = (np.asarray(v.get_value(), np.float64) for v in (src.lora_a, src.lora_b))
        layer.kernel.set_value(jnp.asarray(_base_kernel(src) + CFG.scale * a @ b, jnp.float32))
    ref = ptq.convert(merged, None, rtn, calibration=[X])
    for a, b in zip(_layers(served.model), _layers(ref.model), strict=True):
        qa, qb = vars(a)["kernel"].get_value().weight, vars(b)["kernel"].get_value().weight
        assert np.mean(np.asarray(qa.codes) != np.asarray(qb.codes)) < 2e-3
        np.testing.assert_allclose(np.asarray(qa.scale), np.asarray(qb.scale), rtol=1e-6)


def test_dropout_only_in_training():
    config = lora.LoRA(rank=4, alpha=8.0, dropout=0.5)
    m = lora.adapt(_mlp(), None, [jaxq.Rule(".*", recipe=lora.FLOAT)], config,
                   key=jax.random.key(3)).model  # fmt: skip
    _set_b(m)
    a, b = fwd(m, X), fwd(m, X)
    assert float(jnp.max(jnp.abs(a - b))) > 0  # a new mask each call
    m.eval()
    np.testing.assert_allclose(np.asarray(fwd(m, X)), _reference(m, X), rtol=1e-5, atol=1e-5)


def test_linear_general_and_einsum_layers_add_the_folded_delta():
    """LinearGeneral / Einsum kernels with several axes: y = x (W + ΔW), ΔW = s A B reshaped."""
    rngs = nnx.Rngs(0)
    layers = {"lg": nnx.LinearGeneral(D, (4, 16), rngs=rngs),
              "ein": nnx.Einsum("btd,dhk->bthk", (D, 4, 16), rngs=rngs),
              "out": nnx.Einsum("bthk,hkd->btd", (4, 16, 32), rngs=rngs)}  # fmt: skip
    x = X.reshape(2, 8, D)
    for name, layer in layers.items():
        m = lora.adapt(layer, None, [jaxq.Rule(".*", recipe=lora.FLOAT)], CFG).model
        inp = x if name != "out" else x.reshape(2, 8, 4, 32)[..., :16]
        w = np.asarray(m.kernel.get_value(), np.float64)
        assert m.lora_a.get_value().shape == (w.size // w.shape[-1] if name == "out"
                                              else w.shape[0], 4)  # fmt: skip
        np.testing.assert_array_equal(np.asarray(m(inp)), np.asarray(layer(inp)))
        _set_b(m)
        a, b = (np.asarray(v.get_value(), np.float64) for v in (m.lora_a, m.lora_b))
        w = w + CFG.scale * (a @ b).reshape(w.shape)
        bias = 0.0 if m.bias is None else np.asarray(m.bias.get_value(), np.float64)
        spec = {"lg": "btd,dhk->bthk", "ein": "btd,dhk->bthk", "out": "bthk,hkd->btd"}[name]
        want = np.einsum(spec, np.asarray(inp, np.float64), w) + bias
        np.testing.assert_allclose(np.asarray(m(inp)), want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------ bad input


def test_rank_larger_than_the_layer_names_path_and_shapes():
    with pytest.raises(ValueError, match=r"'layers/2'.*\(128, 64\).*rank 65"):
        lora.adapt(_mlp(), None, [jaxq.Rule(".*", recipe=lora.FLOAT)], lora.LoRA(rank=65))
    with pytest.raises(ValueError, match="rank must be a positive int"):
        lora.LoRA(rank=0)
    with pytest.raises(ValueError, match="quantizes activations"):
        lora.adapt(_mlp(), None, [jaxq.Rule(".*", recipe=ptq.W8A8())], calibration=[X])
    with pytest.raises(ValueError, match="no layer an adapter"):
        lora.adapt(_mlp(), None, [jaxq.Rule("nothing", recipe=lora.FLOAT)])


def test_merge_with_changed_rules_says_what_differs():
    rules = [jaxq.Rule("layers/0", recipe=lora.L4Q(64)), jaxq.Rule(".*", recipe=None)]
    m = lora.adapt(_mlp(), None, rules, CFG, calibration=[X]).model
    with pytest.raises(ValueError, match=r"'layers/2' has no adapter, but rule '\.\*'"):
        lora.merge(m, rules=[jaxq.Rule(".*", recipe=lora.L4Q(64))])
    with pytest.raises(ValueError, match=r"'layers/0' learned its steps for .*block_size=64"):
        lora.merge(m, rules=[jaxq.Rule("layers/0", recipe=lora.L4Q(32))])
    with pytest.raises(ValueError, match=r"'layers/0' has a l4q adapter .* gives it none"):
        lora.merge(m, rules=[jaxq.Rule("layers/2", recipe=None)])
    assert lora.merge(m, rules=[jaxq.Rule("layers/0", recipe=lora.L4Q(64))]).float_layers == (
        "layers/2",)


def test_non_finite_adapters_or_steps_do_not_merge_silently():
    m = adapted(lora.FLOAT)
    layer = _layers(m)[1]
    layer.lora_b.set_value(layer.lora_b.get_value().at[0, 3].set(jnp.inf))
    with pytest.raises(ValueError, match=r"'layers/2' lora_b holds 1 non-finite"):
        lora.merge(m)
    m = adapted(lora.L4Q(64))
    layer = _layers(m)[0]
    layer.lora_log_steps.set_value(layer.lora_log_steps.get_value().at[0, 5, 1, 0].set(-200.0))
    with pytest.raises(ValueError, match=r"'layers/0' lora_log_steps holds 1 non-finite"):
        lora.merge(m)  # exp(-200) is 0 in float32: a zero step


def test_adapting_twice_or_conv_layers_is_an_error():
    m = adapted(lora.FLOAT)
    with pytest.raises(ValueError, match="already adapted"):
        lora.adapt(m, None, [jaxq.Rule(".*", recipe=lora.FLOAT)])
    conv = nnx.eval_shape(lambda: nnx.Conv(3, 8, (3, 3), rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="conv layers have no adapter path"):
        lora.adapt(conv, None, [jaxq.Rule(".*", recipe=lora.FLOAT)])
