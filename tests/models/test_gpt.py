"""GPT model: shapes, parameter count, causality, the dot_general hook, and the forward
pass against an independent float64 numpy implementation."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxq.models import GPT, GPTConfig, merge_model, num_params, split_model

SMALL = GPTConfig(d_model=32, n_heads=4, n_layers=2, seq_len=16)


@nnx.jit
def apply(model, tokens):
    """The model's logits, compiled as one program (eager op-by-op dispatch is slow)."""
    return model(tokens)


def _np_layer_norm(x, p, eps):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def _np_linear(x, p):
    y = x @ np.asarray(p["kernel"], np.float64)
    return y + p["bias"] if "bias" in p else y


def _np_gelu(x):
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def np_gpt_forward(params, config, tokens):
    """Independent float64 reference of the model's forward pass."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    b, t = tokens.shape
    h, hd = config.n_heads, config.head_dim
    x = p["embed"]["embedding"][tokens] + p["pos_embed"]["embedding"][:t][None]
    for i in range(config.n_layers):
        blk = p["blocks"][i]
        y = _np_layer_norm(x, blk["ln1"], config.layer_norm_epsilon)
        q, k, v = np.split(_np_linear(y, blk["attn"]["qkv"]).reshape(b, t, 3, h, hd), 3, axis=2)
        q, k, v = q[:, :, 0], k[:, :, 0], v[:, :, 0]
        s = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
        s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
        a = np.exp(s - s.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        x = x + _np_linear(np.einsum("bhqk,bkhd->bqhd", a, v).reshape(b, t, -1), blk["attn"]["out"])
        y = _np_layer_norm(x, blk["ln2"], config.layer_norm_epsilon)
        x = x + _np_linear(_np_gelu(_np_linear(y, blk["mlp"]["up"])), blk["mlp"]["down"])
    x = _np_layer_norm(x, p["ln_f"], config.layer_norm_epsilon)
    if config.tie_embeddings:
        return x @ p["embed"]["embedding"].T
    return x @ p["readout"]["kernel"]


@pytest.mark.parametrize("tie", [True, False])
def test_shapes_and_param_count_via_eval_shape(tie):
    config = GPTConfig(d_model=64, n_heads=4, n_layers=3, seq_len=32, tie_embeddings=tie,
                       d_ff=96)
    model = nnx.eval_shape(lambda: GPT(config, rngs=nnx.Rngs(0)))
    graphdef, params = split_model(model)
    leaves = jax.tree.leaves(params)
    assert all(isinstance(x, jax.ShapeDtypeStruct) and x.dtype == jnp.float32 for x in leaves)
    assert sum(math.prod(x.shape) for x in leaves) == num_params(config)
    assert params["blocks"][2]["mlp"]["up"]["kernel"].shape == (64, 96)
    assert ("readout" in params) == (not tie)
    tokens = jax.ShapeDtypeStruct((5, 32), jnp.int32)
    out = jax.eval_shape(lambda p, x: merge_model(graphdef, p)(x), params, tokens)
    assert out.shape == (5, 32, 256) and out.dtype == jnp.float32


@pytest.mark.parametrize("tie", [True, False])
def test_forward_matches_float64_numpy_reference(tie):
    config = GPTConfig(d_model=32, n_heads=4, n_layers=2, seq_len=16, tie_embeddings=tie,
                       init_std=0.2)  # large init so that every term matters
    model = GPT(config, rngs=nnx.Rngs(1))
    _, params = split_model(model)
    # non-trivial LayerNorm parameters and biases
    key = jax.random.key(2)
    params = jax.tree.map(
        lambda a: a + 0.1 * jax.random.normal(jax.random.fold_in(key, a.size), a.shape), params
    )
    graphdef, _ = split_model(model)
    tokens = np.random.default_rng(0).integers(0, 256, (3, 16)).astype(np.int32)
    got = np.asarray(apply(merge_model(graphdef, params), tokens))
    want = np_gpt_forward(params, config, tokens)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_causality_future_tokens_never_change_earlier_logits():
    model = GPT(SMALL, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 256, (2, 16)).astype(np.int32)
    base = np.asarray(apply(model, tokens))
    for j in (0, 7, 15):
        changed = tokens.copy()
        changed[:, j:] = (changed[:, j:] + 1 + rng.integers(0, 254, changed[:, j:].shape)) % 256
        out = np.asarray(apply(model, changed))
        np.testing.assert_array_equal(out[:, :j], base[:, :j])
        assert np.abs(out[:, j] - base[:, j]).max() > 1e-4  # position j does see token j


def test_prefix_gives_same_logits_and_1d_input():
    model = GPT(SMALL, rngs=nnx.Rngs(0))
    tokens = np.arange(16, dtype=np.int32)[None] * 7 % 256
    full = np.asarray(apply(model, tokens))
    np.testing.assert_allclose(np.asarray(apply(model, tokens[:, :5])), full[:, :5], atol=1e-5)
    np.testing.assert_allclose(np.asarray(apply(model, tokens[0])), full[0], atol=1e-6)


@pytest.mark.parametrize("tie", [True, False])
def test_dot_general_hook_is_used_by_every_weight_matmul(tie):
    config = GPTConfig(d_model=32, n_heads=4, n_layers=2, seq_len=16, tie_embeddings=tie)
    calls = []

    def halving_dot_general(lhs, rhs, dimension_numbers, **kwargs):
        calls.append(rhs.shape)
        return 0.5 * jax.lax.dot_general(lhs, rhs, dimension_numbers, **kwargs)

    hooked = GPT(config, dot_general=halving_dot_general, rngs=nnx.Rngs(0))
    plain = GPT(config, rngs=nnx.Rngs(0))
    tokens = jnp.ones((1, 8), jnp.int32)
    out = hooked(tokens)
    # per block: qkv, out, up, down; then the readout (tied: the embedding table)
    assert len(calls) == 4 * config.n_layers + 1
    assert calls[-1] == ((256, 32) if tie else (32, 256))
    assert not np.allclose(np.asarray(out), np.asarray(plain(tokens)), atol=1e-3)
    # the hook survives split/merge and jit
    graphdef, params = split_model(hooked)
    jitted = jax.jit(lambda p, x: merge_model(graphdef, p)(x))
    np.testing.assert_allclose(np.asarray(jitted(params, tokens)), np.asarray(out), atol=1e-5)


def test_grad_vmap_and_remat():
    model = GPT(SMALL, rngs=nnx.Rngs(0))
    graphdef, params = split_model(model)
    tokens = jnp.arange(32, dtype=jnp.int32).reshape(2, 16)

    def loss(p, x):
        return jnp.mean(merge_model(graphdef, p)(x) ** 2)

    g = jax.jit(jax.grad(loss))(params, tokens)
    g_remat = jax.jit(jax.grad(jax.checkpoint(loss)))(params, tokens)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(g))
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_remat), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
    per_row = jax.jit(jax.vmap(lambda x: merge_model(graphdef, params)(x)))(tokens)
    np.testing.assert_allclose(np.asarray(per_row), np.asarray(apply(model, tokens)), atol=1e-5)


def test_bf16_compute_dtype_keeps_float32_params_and_logits():
    config = GPTConfig(d_model=32, n_heads=4, n_layers=1, seq_len=16, dtype=jnp.bfloat16)
    model = GPT(config, rngs=nnx.Rngs(0))
    _, params = split_model(model)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    out = apply(model, jnp.ones((1, 16), jnp.int32))
    assert out.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(out)))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(d_model=30, n_heads=4), "divisible by n_heads"),
        (dict(n_layers=0), "n_layers must be positive"),
        (dict(seq_len=-1), "seq_len must be positive"),
        (dict(d_ff=0), "d_ff must be positive"),
        (dict(init_std=0.0), "init_std"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GPTConfig(**kwargs)


def test_config_type_errors():
    with pytest.raises(TypeError, match="d_model must be an int"):
        GPTConfig(d_model=32.0)
    with pytest.raises(TypeError, match="config must be a GPTConfig"):
        GPT({"d_model": 32}, rngs=nnx.Rngs(0))


def test_bad_tokens():
    model = GPT(SMALL, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"length 17 .* seq_len=16"):
        model(jnp.zeros((1, 17), jnp.int32))
    with pytest.raises(TypeError, match="integer token ids"):
        model(jnp.zeros((1, 4), jnp.float32))
    with pytest.raises(ValueError, match=r"shape \(batch, T\)"):
        model(jnp.zeros((1, 2, 4), jnp.int32))
