"""Attention over the cache: grouped-query heads, sliding window, keys cached before RoPE."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from wrapping.gemma_style import rope  # the one RoPE of the test models

from jaxq import kvcache

B, T, HKV, HQ, D, G, R, W = 2, 24, 2, 6, 8, 4, 2, 5


def _qkv(seed=0):
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(kq, (B, T, HQ, D))
    k = jax.random.normal(kk, (B, T, HKV, D)).at[:, :, 1, 2].multiply(20.0)  # outlier channel
    return q, k, jax.random.normal(kv, (B, T, HKV, D))


def _decode(cache, q, k, v, prompt, **options):
    """Prefill ``prompt`` positions in one chunk, then the rest token by token."""
    out, cache = kvcache.update_attend(cache, None, q[:, :prompt], k[:, :prompt],
                                       v[:, :prompt], 0, **options)  # fmt: skip
    outs = [out]
    for p in range(prompt, q.shape[1]):
        out, cache = kvcache.update_attend(cache, None, q[:, p], k[:, p], v[:, p], p, **options)
        np.testing.assert_allclose(kvcache.attend(cache, None, q[:, p], p, **options), out,
                                   rtol=1e-5, atol=1e-5)  # one token: attend reads the same
        outs.append(out)
    return jnp.concatenate(outs, axis=1), cache


def test_prefill_decode_and_teacher_forced_agree_with_gqa_window_and_pre_rope():
    q, k, v = _qkv()
    options = dict(window=W, rope=rope)
    want = kvcache.teacher_forced_attention(q, k, v, fmt="int4", residual=R, group_size=G,
                                            **options)  # fmt: skip
    cache = kvcache.init(B, HKV, T, D, fmt="int4", residual=R, group_size=G)
    got, _ = _decode(cache, q, k, v, 14, **options)
    assert got.shape == (B, T, HQ, D)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt", [None, "int4"])
def test_grouped_queries_equal_repeated_key_value_heads(fmt):
    # (update_attend reads as teacher_forced_attention does: the test above.)
    q, k, v = _qkv()
    n = HQ // HKV
    kr, vr = jnp.repeat(k, n, axis=2), jnp.repeat(v, n, axis=2)  # head h reads h // n
    options = dict(fmt=fmt, residual=R, group_size=G, window=W, rope=rope)
    # The same values summed in another order (grouped einsum against repeated heads):
    # float32 rounding, up to about 1.8e-6 on outputs of order 0.3 on some CPUs.
    np.testing.assert_allclose(kvcache.teacher_forced_attention(q, k, v, **options),
                               kvcache.teacher_forced_attention(q, kr, vr, **options),
                               rtol=1e-5, atol=1e-5)  # fmt: skip


def test_float_cache_of_pre_rope_keys_equals_post_rope_cache():
    q, k, v = _qkv(2)
    post_k = rope(k, jnp.arange(T))
    cache = kvcache.init(B, HKV, T, D, fmt=None, layers=2)
    pre, c_pre = kvcache.update_attend(cache, 1, q, k, v, 0, window=W, rope=rope)
    post, c_post = kvcache.update_attend(cache, 1, q, post_k, v, 0, window=W)
    np.testing.assert_allclose(pre, post, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(c_pre.k_codes[1], k)  # stored as given: before RoPE
    np.testing.assert_array_equal(c_post.k_codes[1], post_k)


@pytest.mark.parametrize("fmt", [None, "int8"])
def test_positions_before_the_window_do_not_affect_the_output(fmt):
    q, k, v = _qkv(3)
    p = 19  # reads positions 15..19 (W = 5)
    cache = kvcache.init(B, HKV, T, D, fmt=fmt, group_size=G)

    def out_with(j):  # key and value of position j replaced by large new ones
        kj, vj = k.at[:, j].set(50.0), v.at[:, j].set(-50.0)
        c = kvcache.update(cache, None, kj[:, :p], vj[:, :p], 0)
        return kvcache.update_attend(c, None, q[:, p], kj[:, p], vj[:, p], p, window=W)[0]

    base = out_with(p + 1)  # a position not written yet: the unperturbed output
    # A float cache: any position before the window. A quantized one: positions whose key
    # block (G = 4 positions) lies wholly before the window; position 14 shares the scale
    # of block 12..15 with position 15, which the window reads.
    for j in (0, 11) + ((14,) if fmt is None else ()):
        np.testing.assert_array_equal(out_with(j), base)
    assert float(jnp.max(jnp.abs(out_with(15) - base))) > 1e-2  # the window's first position


def test_window_under_jit_may_be_traced_and_overrun_reads_as_last_position():
    q, k, v = _qkv(4)
    cache = kvcache.update(kvcache.init(B, HKV, T, D, fmt="int8", group_size=G), None, k, v, 0)

    @jax.jit
    def at(c, qi, p, w):
        return kvcache.attend(c, None, qi, p, window=w)

    last = at(cache, q[:, -1], jnp.int32(T - 1), jnp.int32(W))
    np.testing.assert_allclose(last, kvcache.attend(cache, None, q[:, -1], T - 1, window=W),
                               rtol=1e-6, atol=1e-6)  # fmt: skip
    np.testing.assert_allclose(at(cache, q[:, -1], jnp.int32(T + 3), jnp.int32(W)), last,
                               rtol=1e-6, atol=1e-6)  # past max_len: as position T - 1
    everything = at(cache, q[:, -1], jnp.int32(T - 1), jnp.int32(2**31 - 1))
    np.testing.assert_allclose(everything, kvcache.attend(cache, None, q[:, -1], T - 1),
                               rtol=1e-6, atol=1e-6)  # fmt: skip


def test_argument_errors():
    q, k, v = _qkv(5)
    cache = kvcache.init(B, HKV, T, D, fmt="int8")
    bad_q = jnp.zeros((B, 1, 5, D))
    msg = (r"multiple of the key/value heads: q has shape \(2, 1, 5, 8\) \(5 heads\).*"
           r"\(2, 24, 2, 8\) \(2 heads\)")
    with pytest.raises(ValueError, match=msg):
        kvcache.attend(cache, None, bad_q, 0)
    with pytest.raises(ValueError, match=msg):
        kvcache.update_attend(cache, None, bad_q, k[:, :1], v[:, :1], 0)
    with pytest.raises(ValueError, match=r"q has shape \(2, 24, 5, 8\) \(5 heads\), k has shape"):
        kvcache.teacher_forced_attention(jnp.zeros((B, T, 5, D)), k, v)
    with pytest.raises(ValueError, match="window must be >= 1"):
        kvcache.attend(cache, None, q[:, 0], 0, window=0)
    with pytest.raises(TypeError, match="window must be None or an integer"):
        kvcache.teacher_forced_attention(q, k, v, window=2.5)
    with pytest.raises(TypeError, match="rope must be None or a callable"):
        kvcache.update_attend(cache, None, q[:, 0], k[:, 0], v[:, 0], 0, rope="yes")
    with pytest.raises(ValueError, match="rope must return keys of shape"):
        kvcache.teacher_forced_attention(q, k, v, fmt=None, rope=lambda x, p: x[..., :4])
