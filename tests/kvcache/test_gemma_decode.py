"""Decoding a Gemma-style NNX decoder (GQA, RoPE, sliding window) through jaxq.kvcache."""

import dataclasses
import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxq import kvcache
from jaxq.kvcache import kivi

from . import gemma_decoder as gd

CFG = gd.Config()  # 4 layers (local, global, local, global), 4 query / 2 key-value heads
T, B, G = CFG.max_len, 2, 8


def _random_decoder(seed=0, outliers=None, config=CFG):
    """Random parameters drawn with numpy into the model's abstract structure (much faster
    than the initialisers on busy CPUs); a block scale of 0.3 keeps the readout from just
    copying the input token. ``outliers``: "scale" multiplies key channels 1 and 2 of every
    key/value head by 10 (zero-mean outliers); "offset" gives every token's embedding a
    shared feature that large key weights carry into those channels (outliers of a constant
    magnitude, as KVQuant observes before RoPE)."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: gd.Decoder(config, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(seed)

    def draw(path, x):
        name = jax.tree_util.keystr(path)
        if "norm" in name:
            return jnp.ones(x.shape, x.dtype)
        a = rng.normal(0.0, 1 / 8 if "embed" in name else 0.3, x.shape)
        if "embed" in name and outliers == "offset":
            a[:, 0] = 0.5
        if "'k'" in name and outliers == "scale":
            a[..., [1, 2]] *= 10.0
        if "'k'" in name and outliers == "offset":  # (layers, d, kv_heads, head_dim)
            for c in (1, 2):
                a[:, 0, :, c] = 3.0 * rng.choice([-1.0, 1.0], size=(a.shape[0], a.shape[2]))
        return jnp.asarray(a, x.dtype)

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(draw, state))


@pytest.fixture(scope="module")
def model():
    return _random_decoder()


@pytest.fixture(scope="module")
def tokens():
    return jax.random.randint(jax.random.key(1), (B, T), 0, CFG.vocab)


@pytest.fixture(scope="module")
def full(model, tokens):
    return gd.forward(model, tokens)


def _decode(model, tokens, prompt, *, pre_rope=False, **options):
    """Prefill ``prompt`` tokens (if any), then decode the rest one at a time."""
    cache = gd.cache_for(model, tokens.shape[0], group_size=G, **options)
    out = []
    if prompt:
        logits, cache = gd.prefill(model, cache, tokens[:, :prompt], pre_rope=pre_rope)
        out.append(logits)
    for p in range(prompt, tokens.shape[1]):
        step, cache = gd.decode_step(model, cache, tokens[:, p], p, pre_rope=pre_rope)
        out.append(step[:, None])
    return jnp.concatenate(out, axis=1), cache


def _close(got, want, rtol=1e-5):
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * float(jnp.max(jnp.abs(want))))


def test_float_cache_decoding_equals_full_forward(model, tokens, full):
    windows = set(np.asarray(CFG.windows()).tolist())
    assert CFG.kv_heads < CFG.heads and CFG.window < T and windows == {CFG.window, gd.GLOBAL}
    # Keys cached before RoPE and rotated when read: the logits of the full forward (which
    # rotates keys before attending), up to float32 rounding. Keys cached after RoPE:
    # test_generate_with_float_cache_equals_repeated_full_forwards.
    got, _ = _decode(model, tokens, 5, fmt=None, pre_rope=True)
    _close(got, full)
    assert len(np.unique(np.asarray(jnp.argmax(full, -1)))) > 8  # not a degenerate model


def _check_close(logits, full, max_err, min_agree, name):
    err = float(jnp.linalg.norm(logits - full) / jnp.linalg.norm(full))
    agree = float(jnp.mean(jnp.argmax(logits, -1) == jnp.argmax(full, -1)))
    print(f"{name}: relative logit error {err:.4f}, greedy (top-1) agreement {agree:.3f}")
    assert 1e-4 < err < max_err
    assert agree >= min_agree


def test_int8_cache_decoding_stays_close_to_float(model, tokens, full):
    # Token-by-token decoding through an int8 cache of keys before RoPE, with a float
    # window of 2 tokens. (That decoding equals the teacher-forced path, which the next
    # test uses, is checked on the attention itself in test_attention.py.)
    got, cache = _decode(model, tokens, 0, fmt="int8", residual=2, pre_rope=True)
    assert cache.k_codes.dtype == jnp.int8
    _check_close(got, full, 0.05, 0.85, "int8, R=2, pre-RoPE keys")


@pytest.mark.parametrize(
    ("options", "max_err", "min_agree"),
    [(dict(fmt="e4m3"), 0.2, 0.8), (dict(fmt="int4", residual=4), 0.4, 0.6)],
    ids=["e4m3", "int4-R4"],
)
def test_fp8_and_int4_caches_stay_close_to_float(model, tokens, full, options, max_err,
                                                 min_agree):  # fmt: skip
    logits = gd.teacher_forced_logits(model, tokens, group_size=G, **options)
    _check_close(logits, full, max_err, min_agree, str(options))


def test_generate_with_float_cache_equals_repeated_full_forwards(model, tokens):
    prompt, steps = tokens[:, :5], 10
    got = gd.generate(model, prompt, steps)
    seq = jnp.zeros((B, T), jnp.int32).at[:, :5].set(prompt)  # causal: padding is unseen
    for i in range(steps):
        seq = seq.at[:, 5 + i].set(jnp.argmax(gd.forward(model, seq)[:, 4 + i], axis=-1))
    np.testing.assert_array_equal(got, seq[:, 5 : 5 + steps])


def _rope_errors(model, tokens):
    """Relative errors of the first block's attention output and of its keys as attention
    reads them (rotated), with keys quantized before and after RoPE."""
    graphdef, state = nnx.split(model.blocks)
    block = nnx.merge(graphdef, jax.tree.map(lambda a: a[0], state))
    h = block.attn_norm(model._embed(tokens))
    pos = jnp.arange(T)
    q, k, v = gd.rope(block.attn.q(h), pos), block.attn.k(h), block.attn.v(h)
    return _rope_errors_jit(q, k, v)


@jax.jit
def _rope_errors_jit(q, k, v):
    pos = jnp.arange(T)
    post_k = gd.rope(k, pos)
    ref = kvcache.teacher_forced_attention(q, post_k, v, fmt=None)

    def rel(x, y):
        return jnp.linalg.norm(x - y) / jnp.linalg.norm(y)

    out = {}
    for name in ("int4", "int8"):
        fmt = kivi.resolve_format(name)
        for rope, keys in (("pre", k), ("post", post_k)):
            # A full cache (residual 0, G dividing T) stores every key per channel over its
            # block of G positions.
            codes, scales = kivi.quantize_groups(keys.reshape(B, T // G, G, *keys.shape[2:]),
                                                 fmt, axis=2)  # fmt: skip
            stored = (kivi.dequantize_codes(codes, fmt, keys.shape[-1]) * scales[:, :, None])
            stored = stored.reshape(keys.shape)
            out[name, rope, "keys"] = rel(gd.rope(stored, pos) if rope == "pre" else stored,
                                          post_k)  # fmt: skip
        pre = kvcache.teacher_forced_attention(q, k, v, fmt=name, group_size=G, rope=gd.rope)
        post = kvcache.teacher_forced_attention(q, post_k, v, fmt=name, group_size=G)
        out[name, "pre", "attention"], out[name, "post", "attention"] = (rel(pre, ref),
                                                                         rel(post, ref))
    return out


@pytest.mark.parametrize("outliers", ["scale", "offset"])
def test_pre_rope_key_quantization_against_post_rope(tokens, outliers):
    """Keys with outlier channels, 8 random models: quantized before RoPE, the keys attention
    reads are closer to the float ones on every model. The attention output has no reliable
    direction (symmetric absmax codes gain only the partner channel of each RoPE pair, and a
    peaked softmax turns small key errors into near-tie flips): its error is on average
    within a few percent of post-RoPE's, so only that is asserted."""
    runs = [_rope_errors(_random_decoder(seed, outliers), tokens) for seed in range(8)]
    for fmt in ("int4", "int8"):
        ratio = {what: np.array([float(e[fmt, "pre", what] / e[fmt, "post", what])
                                 for e in runs]) for what in ("keys", "attention")}  # fmt: skip
        print(f"{outliers} outliers, {fmt}, pre-RoPE / post-RoPE error: " + ", ".join(
            f"{w} {r.mean():.3f} ({r.min():.3f}..{r.max():.3f})" for w, r in ratio.items()))
        assert np.all(ratio["keys"] < 1.0)
        assert 0.85 < ratio["attention"].mean() < 1.15


def test_positions_before_a_local_layers_window_do_not_affect_decoding(model, tokens):
    p = 20  # layer 0 (local, window 6) reads positions 15..20 when decoding position 20
    _, cache = _decode(model, tokens[:, :p], 5, fmt=None, pre_rope=True)  # 0..19 written
    step = functools.partial(gd.decode_step, model, token=tokens[:, p], pos=p, pre_rope=True)
    base, _ = step(jax.tree.map(jnp.copy, cache))

    def perturbed(j):  # layer 0's cached key and value of position j replaced
        c = jax.tree.map(jnp.copy, cache)
        c = dataclasses.replace(c, k_codes=c.k_codes.at[0, :, j].set(30.0),
                                v_codes=c.v_codes.at[0, :, j].set(-30.0))  # fmt: skip
        return step(c)[0]

    for j in (0, p - CFG.window):
        np.testing.assert_array_equal(perturbed(j), base)
    assert float(jnp.max(jnp.abs(perturbed(p - CFG.window + 1) - base))) > 1e-3
    # In a global layer (layer 1) the same old position does matter.
    c = jax.tree.map(jnp.copy, cache)
    c = dataclasses.replace(c, v_codes=c.v_codes.at[1, :, 0].set(-30.0))
    assert float(jnp.max(jnp.abs(step(c)[0] - base))) > 1e-3


def test_grouped_query_heads_must_be_a_multiple_of_the_key_value_heads(tokens):
    odd = _random_decoder(config=dataclasses.replace(CFG, kv_heads=3))  # 4 query heads
    cache = gd.cache_for(odd, B)
    with pytest.raises(ValueError, match=r"multiple of the key/value heads: q has shape "
                                         r"\(2, 1, 4, 16\) \(4 heads\).* \(3 heads\)"):  # fmt: skip
        gd.decode_step(odd, cache, tokens[:, 0], 0)


def test_decode_step_donates_the_cache(model, tokens):
    cache = gd.cache_for(model, B, fmt=None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "donated buffers were not usable"
        _, new = gd.prefill(model, cache, tokens[:, :5], pre_rope=True)
        old, (_, new) = new, gd.decode_step(model, new, tokens[:, 5], 5, pre_rope=True)
    assert all(x.is_deleted() for x in jax.tree.leaves(cache) + jax.tree.leaves(old))
    assert not any(x.is_deleted() for x in jax.tree.leaves(new))


def test_overrun_raises_for_a_host_position_and_is_dropped_for_a_device_one(model, tokens):
    _, cache = _decode(model, tokens, 5, fmt=None, pre_rope=True)  # all T positions written
    with pytest.raises(ValueError, match=r"pos=32..32 do not fit a cache of max_len=32"):
        gd.decode_step(model, cache, tokens[:, 0], T)
    with pytest.raises(ValueError, match="needs 35 positions, more than max_len=32"):
        gd.generate(model, tokens[:, :5], 31)
    kept = jax.tree.map(jnp.copy, cache)
    logits, over = gd.decode_step(model, cache, tokens[:, 0], jnp.int32(T), pre_rope=True)
    np.testing.assert_array_equal(over.overflow, [1] * CFG.layers)
    np.testing.assert_array_equal(over.k_codes, kept.k_codes)  # nothing written or wrapped
    assert bool(jnp.all(jnp.isfinite(logits)))
