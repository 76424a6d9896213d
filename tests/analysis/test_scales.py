"""Tests of jaxq.analysis: names, log2 RMS against numpy, flags, the PNG."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxq import formats
from jaxq.analysis import ScaleReport, TensorScale, format_range, plot_scales, track_scales


def _log2_rms(a) -> float:
    a = np.asarray(a, np.float64)
    return 0.5 * math.log2(np.mean(a**2))


def _tiny(seed=0):
    rng = np.random.default_rng(seed)
    w1 = rng.normal(size=(4, 8)).astype(np.float32) * 0.5
    b1 = rng.normal(size=(8,)).astype(np.float32) * 0.1
    w2 = rng.normal(size=(8, 3)).astype(np.float32) * 0.3
    x = rng.normal(size=(5, 4)).astype(np.float32) * 2.0
    return w1, b1, w2, x


def _loss(w1, b1, w2, x):
    with jax.named_scope("l1"):
        a1 = x @ w1 + b1
    with jax.named_scope("act"):
        h = jnp.tanh(a1)
    with jax.named_scope("l2"):
        y = h @ w2
    return jnp.mean(y**2)


def _one(rep, name, phase, shape=None):
    hits = [
        e
        for e in rep.find(name, phase=phase)
        if e.name == name and (shape is None or e.shape == shape)
    ]
    assert len(hits) == 1, (name, phase, [e.name for e in rep])
    return hits[0]


def test_log2_rms_matches_numpy_forward_and_backward():
    w1, b1, w2, x = _tiny()
    rep = track_scales(_loss, w1, b1, w2, x)
    # Independent float64 forward and hand-derived backward.
    d = {k: v.astype(np.float64) for k, v in dict(w1=w1, b1=b1, w2=w2, x=x).items()}
    z1 = d["x"] @ d["w1"]
    h = np.tanh(z1 + d["b1"])
    y = h @ d["w2"]
    dy = 2 * y / y.size
    dh = dy @ d["w2"].T
    da1 = dh * (1 - h**2)
    want = {
        ("l1/dot_general", "forward"): z1,
        ("l1/add", "forward"): z1 + d["b1"],
        ("act/tanh", "forward"): h,
        ("l2/dot_general", "forward"): y,
        ("integer_pow", "forward"): y**2,
        ("l2/dot_general", "backward"): dh,
    }
    for (name, phase), ref in want.items():
        e = _one(rep, name, phase, ref.shape)
        assert e.dtype == "float32"
        assert e.log2_rms == pytest.approx(_log2_rms(ref), abs=1e-5), name
        assert e.log2_amax == pytest.approx(math.log2(np.abs(ref).max()), abs=1e-5), name
    grads = {"w1": d["x"].T @ da1, "b1": da1.sum(0), "w2": h.T @ dy, "x": da1 @ d["w1"].T}
    for k, ref in grads.items():
        e = rep.gradients[k]
        assert e.phase == "backward" and e.shape == ref.shape
        assert e.log2_rms == pytest.approx(_log2_rms(ref), abs=1e-5), k
    for k, v in dict(w1=w1, b1=b1, w2=w2, x=x).items():
        e = _one(rep, k, "input")
        assert e.log2_rms == pytest.approx(_log2_rms(v), abs=1e-6)
    assert [e.index for e in rep] == list(range(len(rep)))


def test_every_float_intermediate_is_listed():
    w1, b1, w2, x = _tiny()
    rep = track_scales(_loss, w1, b1, w2, x)
    jaxpr = jax.make_jaxpr(jax.value_and_grad(_loss, argnums=(0, 1, 2, 3)))(w1, b1, w2, x)
    n_float = sum(
        1
        for eqn in jaxpr.eqns
        for v in eqn.outvars
        if jnp.issubdtype(v.aval.dtype, jnp.floating) and v.aval.size > 0
    )
    assert len(rep.forward) + len(rep.backward) == n_float
    assert len(rep.inputs) == 4
    assert {e.phase for e in rep} == {"input", "forward", "backward"}


def test_ops_inside_jit_and_checkpoint_are_listed_with_scope():
    @jax.jit
    def inner(z):
        return jnp.sin(z) * 3.0

    def f(x):
        return jnp.sum(jax.checkpoint(inner)(x) ** 2)

    rep = track_scales(f, jnp.linspace(0.1, 1.0, 7))
    sins = [e for e in rep if e.primitive == "sin"]
    assert sins and all("inner" in e.scope for e in sins)
    x = np.linspace(0.1, 1.0, 7)
    g = 2 * (3 * np.sin(x)) * 3 * np.cos(x)
    assert rep.gradients["x"].log2_rms == pytest.approx(_log2_rms(g), abs=1e-5)


class _MLP(nnx.Module):
    def __init__(self, rngs):
        self.fc1 = nnx.Linear(4, 16, rngs=rngs)
        self.fc2 = nnx.Linear(16, 3, rngs=rngs)

    def __call__(self, x):
        return self.fc2(jax.nn.relu(self.fc1(x)))  # two module calls on one line


def _mse(model, x):
    return jnp.mean(model(x) ** 2)


def test_nnx_module_paths_show_up():
    rep = track_scales(_mse, _MLP(nnx.Rngs(0)), jnp.ones((2, 4)))
    names = {e.name for e in rep}
    assert {"fc1/kernel", "fc1/bias", "fc2/kernel", "x"} <= {e.name for e in rep.inputs}
    assert {"fc1/dot_general", "fc2/dot_general", "fc1/add"} <= names
    assert set(rep.gradients) == {"fc1/kernel", "fc1/bias", "fc2/kernel", "fc2/bias", "x"}
    assert rep.gradients["fc1/kernel"].module == "fc1"
    assert rep.gradients["fc2/bias"].module == "fc2"
    # Every backward op inside a Linear is attributed to the right layer.
    bwd_mods = {e.module for e in rep.backward if e.module}
    assert bwd_mods == {"fc1", "fc2"}
    # relu is called in MLP.__call__ itself: the root module (path "").
    relu = [e for e in rep.forward if e.primitive == "max"]
    assert relu and relu[0].module == "" and relu[0].scope == "relu"
    assert all(e.source.endswith(".py:" + e.source.rsplit(":", 1)[1]) for e in rep.forward)


class _Block(nnx.Module):
    def __init__(self, rngs):
        self.lin = nnx.Linear(8, 8, rngs=rngs)

    def __call__(self, x):
        return x + jnp.tanh(self.lin(x))


class _Looped(nnx.Module):
    def __init__(self, rngs):
        self.layers = nnx.List([_Block(rngs) for _ in range(3)])

    def __call__(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class _Unrolled(_Looped):
    def __call__(self, x):
        x = self.layers[0](x)
        x = self.layers[1](x)
        x = self.layers[2](x)
        return x


def test_nnx_loop_paths_are_exact_or_wildcards_never_wrong():
    x = jnp.ones((2, 8))
    loop = track_scales(_mse, _Looped(nnx.Rngs(0)), x)
    flat = track_scales(_mse, _Unrolled(nnx.Rngs(0)), x)
    assert len(loop) == len(flat)
    n_exact = 0
    for a, b in zip(loop, flat, strict=True):
        assert (a.primitive, a.phase, a.shape) == (b.primitive, b.phase, b.shape)
        assert a.log2_rms == pytest.approx(b.log2_rms, abs=1e-6)
        if b.module is None or a.module is None:
            assert a.module == b.module
            continue
        assert "*" not in b.module  # distinct call sites resolve exactly
        pattern = "^" + re.escape(a.module).replace(r"\*", "[^/]+") + "$"
        assert re.match(pattern, b.module), (a.label, a.module, b.module)
        n_exact += a.module == b.module
    for i in range(3):
        assert _one(loop, f"layers/{i}/lin/dot_general", "forward")
    assert n_exact > 0.6 * sum(e.module is not None for e in loop)


def test_misscaled_layer_is_flagged():
    model = _MLP(nnx.Rngs(1))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 4)), jnp.float32)
    ok = track_scales(_mse, model, x)
    assert ok.flagged(formats.E4M3, phases=("input", "forward")) == ()
    model.fc2.kernel[...] = model.fc2.kernel[...] * 2.0**20
    bad = track_scales(_mse, model, x)
    hits = {(e.name, e.phase): why for e, why in bad.flagged(formats.E4M3)}
    assert hits[("fc2/kernel", "input")] == "overflow"
    assert hits[("fc2/dot_general", "forward")] == "overflow"
    assert not any(n.startswith("fc1") and p == "forward" for n, p in hits)
    # E5M2 reaches 2^15.8: the 2^20-scaled weights overflow it too.
    assert ("fc2/kernel", "input") in {(e.name, e.phase) for e, _ in bad.flagged("e5m2")}
    model.fc2.kernel[...] = model.fc2.kernel[...] * 2.0**-45
    tiny = track_scales(_mse, model, x)
    hits = {(e.name, e.phase): why for e, why in tiny.flagged("e4m3")}
    assert hits[("fc2/dot_general", "forward")] == "underflow"
    assert ("fc1/dot_general", "forward") not in hits


def test_margin_and_phase_filters():
    rep = track_scales(lambda x: jnp.sum(x * 64.0), jnp.ones(4))  # forward RMS 2^6
    assert rep.flagged("e4m3") == ()
    flagged = rep.flagged("e4m3", margin=3.0, phases=("forward",))
    assert [(e.primitive, why) for e, why in flagged][0] == ("mul", "overflow")
    with pytest.raises(ValueError, match="margin"):
        rep.flagged("e4m3", margin=-1.0)
    with pytest.raises(ValueError, match="phases"):
        rep.flagged("e4m3", phases=("sideways",))
    with pytest.raises(TypeError, match="float element format"):
        rep.flagged(formats.INT8)
    lo, mid, hi = format_range(formats.E4M3)
    assert (2.0**lo, 2.0**mid) == (formats.E4M3.min_subnormal, formats.E4M3.min_normal)
    assert 2.0**hi == pytest.approx(formats.E4M3.max, rel=1e-12)


def test_nonfinite_and_zero_tensors():
    x = jnp.asarray([0.0, 1.0, 4.0])
    rep = track_scales(lambda x: jnp.sum(jnp.sqrt(x)), x)
    g = rep.gradients["x"]  # 0.5 / sqrt(x) = [inf, 0.5, 0.25]
    assert g.nonfinite == 1
    assert g.log2_rms == pytest.approx(_log2_rms([0.5, 0.25]), abs=1e-6)
    assert (g, "nonfinite") in rep.flagged("e4m3")
    z = track_scales(lambda w: jnp.sum(w * 0.0), jnp.ones(3))
    zeros = [e for e in z.forward if e.primitive == "mul"]
    assert zeros[0].log2_rms == -math.inf and zeros[0].log2_amax == -math.inf
    assert z.flagged("e4m3") == ()


def test_bad_inputs():
    with pytest.raises(ValueError, match="real floating-point scalar"):
        track_scales(lambda x: x * 2, jnp.ones(3))
    with pytest.raises(TypeError, match="floating-point"):
        track_scales(lambda i: jnp.sum(i) * 1.0, jnp.arange(3))
    with pytest.raises(TypeError, match="callable"):
        track_scales(3, jnp.ones(3))


def test_integer_leaves_are_held_fixed():
    rep = track_scales(lambda x, i: jnp.sum(x[i] ** 2), jnp.arange(4.0), jnp.asarray([1, 3]))
    assert [e.name for e in rep.inputs] == ["x"]
    assert rep.gradients["x"].log2_rms == pytest.approx(_log2_rms([0, 2, 0, 6]), abs=1e-6)


def test_plot_writes_a_png(tmp_path):
    model = _MLP(nnx.Rngs(0))
    model.fc2.kernel[...] = model.fc2.kernel[...] * 2.0**20
    rep = track_scales(_mse, model, jnp.ones((2, 4)))
    path = plot_scales(rep, tmp_path / "scales.png")
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    import matplotlib.pyplot as plt

    img = plt.imread(path)
    assert img.ndim == 3 and img.shape[0] > 300 and img.shape[1] > 600
    with pytest.raises(ValueError, match="no tensors"):
        plot_scales(ScaleReport(()), tmp_path / "empty.png")
    with pytest.raises(TypeError, match="ScaleReport"):
        plot_scales([], tmp_path / "x.png")


def test_plot_without_matplotlib_says_how_to_install(tmp_path, monkeypatch):
    import sys

    rep = ScaleReport((TensorScale(0, "x", "input", "input", (1,), "float32", 0.0, 0.0, 0),))
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match="pip install matplotlib"):
        plot_scales(rep, tmp_path / "x.png")


def test_device_statistics_agree_with_host_statistics():
    rng = np.random.default_rng(3)
    w = rng.normal(size=(4, 3)).astype(np.float32)
    x = rng.normal(size=(5, 4)).astype(np.float32)
    x[0, 0] = np.inf  # non-finite input: counted, excluded from the RMS on both paths

    def f(w, x):
        return jnp.sum(jnp.tanh(x @ w) * 3.0)

    host = track_scales(f, w, x)
    dev = track_scales(f, w, x, stats_on_device=True)
    assert [e.name for e in host] == [e.name for e in dev]
    for a, b in zip(host, dev, strict=True):
        assert a.nonfinite == b.nonfinite
        for u, v in ((a.log2_rms, b.log2_rms), (a.log2_amax, b.log2_amax)):
            assert (math.isnan(u) and math.isnan(v)) or u == pytest.approx(v, abs=1e-4)
    assert host.inputs[1].nonfinite == 1
    assert host.inputs[1].log2_rms == pytest.approx(_log2_rms(x.ravel()[1:]), abs=1e-6)


def test_bfloat16_tensors_and_scan():
    w = (np.arange(12, dtype=np.float32).reshape(3, 4) / 7 - 0.5).astype(jnp.bfloat16)
    xs = jnp.ones((5, 3), jnp.bfloat16)

    def f(w, xs):
        def step(c, x):
            return c + jnp.tanh(x @ w), None

        c, _ = jax.lax.scan(step, jnp.zeros(4, jnp.bfloat16), xs)
        return jnp.sum(c.astype(jnp.float32) ** 2)

    rep = track_scales(f, w, xs)
    assert rep.inputs[0].dtype == "bfloat16"
    assert rep.inputs[0].log2_rms == pytest.approx(_log2_rms(np.asarray(w, np.float64)), abs=1e-9)
    scans = [e for e in rep if e.primitive == "scan"]
    assert {e.phase for e in scans} == {"forward", "backward"}
    assert rep.gradients["w"].dtype == "bfloat16"
