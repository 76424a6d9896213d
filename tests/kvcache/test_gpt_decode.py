"""Cached decoding of jaxq.models.GPT: exact with a float cache, close with int8."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxq import kvcache
from jaxq.models import GPT, GPTConfig
from jaxq.models.train import cross_entropy

T = 32


@pytest.fixture(scope="module")
def model():
    # A larger init_std than the default gives peaked, input-dependent logits, so argmax
    # comparisons and quantization errors are not trivially small.
    # Random parameters drawn with numpy into the model's abstract structure: much faster
    # than running the initialisers on busy CPUs. LayerNorms start at scale 1, bias 0.
    config = GPTConfig(d_model=64, n_heads=4, n_layers=2, seq_len=T)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: GPT(config, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(0)

    def draw(path, x):
        name = jax.tree_util.keystr(path)
        if "'ln" in name:
            return jnp.full(x.shape, 1.0 if "'scale'" in name else 0.0, x.dtype)
        return jnp.asarray(rng.normal(0.0, 0.1, x.shape), x.dtype)  # peaked logits

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(draw, state))


@pytest.fixture(scope="module")
def tokens():
    return jax.random.randint(jax.random.key(1), (2, T + 1), 0, 256)  # T inputs + targets


@pytest.fixture(scope="module")
def forward(model):
    return jax.jit(lambda s: model(s))


def _decode_all(model, tokens, prompt, **options):
    """Prefill ``prompt`` tokens (if any), then feed the rest one at a time."""
    cache = kvcache.cache_for(model, tokens.shape[0], **options)
    out = []
    if prompt:
        logits, cache = kvcache.prefill(model, cache, tokens[:, :prompt])
        out.append(logits)
    for p in range(prompt, tokens.shape[1]):
        step, cache = kvcache.decode_step(model, cache, tokens[:, p], p)
        out.append(step[:, None])
    return jnp.concatenate(out, axis=1)


def test_float_cache_decoding_equals_full_forward(model, tokens, forward):
    want = forward(tokens[:, :T])
    got = _decode_all(model, tokens[:, :T], 7, fmt=None)
    scale = float(jnp.max(jnp.abs(want)))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * scale)
    tf = kvcache.teacher_forced_logits(model, tokens[:, :T], fmt=None, group_size=8)
    np.testing.assert_allclose(tf, want, rtol=1e-5, atol=1e-5 * scale)


def test_greedy_generation_with_float_cache_equals_repeated_full_forwards(model, tokens,
                                                                            forward):
    prompt, steps = tokens[:, :5], 12
    got = kvcache.generate(model, prompt, steps, fmt=None)
    seq = jnp.zeros((2, T), jnp.int32).at[:, :5].set(prompt)  # causal: padding is unseen
    for i in range(steps):
        nxt = jnp.argmax(forward(seq)[:, 4 + i], axis=-1)
        seq = seq.at[:, 5 + i].set(nxt)
    np.testing.assert_array_equal(got, seq[:, 5 : 5 + steps])
    assert len(np.unique(np.asarray(got))) > 2  # not a degenerate repetition


def test_teacher_forced_logits_equal_int8_cache_decoding(model, tokens, forward):
    options = dict(fmt="int8", residual=3, group_size=8)  # as the loss test: one compile
    want = kvcache.teacher_forced_logits(model, tokens[:, :T], **options)
    got = _decode_all(model, tokens[:, :T], 0, **options)  # chunked prefill: test_cache
    scale = float(jnp.max(jnp.abs(want)))
    # float32 summation order (and a rare code at a rounding tie) differ between the two
    # compiled programs; the quantization itself moves the logits far more.
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * scale)
    err = float(jnp.max(jnp.abs(want - forward(tokens[:, :T]))))
    assert 1e-3 * scale < err < 3e-2 * scale, err / scale  # the quantization is visible


def test_int8_teacher_forced_loss_within_half_percent_of_float(model, tokens, forward):
    base = kvcache.teacher_forced_loss(model, tokens, fmt=None, group_size=8)
    np.testing.assert_allclose(base, cross_entropy(forward(tokens[:, :-1]), tokens[:, 1:]),
                               rtol=1e-5)
    int8 = kvcache.teacher_forced_loss(model, tokens, fmt="int8", residual=3, group_size=8)
    assert abs(float(int8) / float(base) - 1) < 5e-3
    assert float(int8) != float(base)


def test_errors(model, tokens):
    cache = kvcache.cache_for(model, 2, fmt="int8", max_len=16)
    with pytest.raises(ValueError, match="max_len=40 exceeds the model's seq_len=32"):
        kvcache.cache_for(model, 2, max_len=40)
    with pytest.raises(ValueError, match="pos=16..16 .*max_len=16"):
        kvcache.decode_step(model, cache, tokens[:, 0], 16)
    with pytest.raises(TypeError, match="integer token ids"):
        kvcache.decode_step(model, cache, jnp.zeros((2,)), 0)
    with pytest.raises(ValueError, match=r"plus steps=30 needs 34 positions.*seq_len=32"):
        kvcache.generate(model, tokens[:, :5], 30)
    with pytest.raises(ValueError, match="needs a PRNG key"):
        kvcache.generate(model, tokens[:, :5], 3, greedy=False)
    with pytest.raises(ValueError, match="layers=1"):
        kvcache.prefill(model, kvcache.init(2, 4, 16, 16, layers=1), tokens[:, :3])
