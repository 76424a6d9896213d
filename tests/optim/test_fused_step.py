"""The pieces that keep the quantized update step to few passes over memory.

Each is checked against its plain definition, and the compiled 8-bit and FP8 AdamW steps
are checked to write no float32 intermediate of the parameter's size.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxq import optim
from jaxq.optim import blockwise as bw
from jaxq.optim import maps


def _compare_count(book, x):
    """Reference nearest-code rule: #{j : cuts[j] < x} in float32."""
    return (x[:, None] > book.cuts[None, :]).sum(axis=1)


def test_linear_map_closed_form_matches_comparisons():
    book = maps.LINEAR4
    assert book.grid is not None
    mids = ((book.values[:-1] + book.values[1:]) / np.float32(2)).astype(np.float32)
    near = [np.nextafter(mids, np.float32(-np.inf)), mids, np.nextafter(mids, np.float32(np.inf))]
    rng = np.random.default_rng(0)
    edges = np.array([0.0, -0.0, 1.0, 1.5, 1e-45, 1e-38, 1 / 16, 3 / 32, 0.5], np.float32)
    x = np.concatenate([*near, edges, rng.random(20000, np.float32), -rng.random(100, np.float32)])
    x = x.astype(np.float32)
    got = np.asarray(jax.jit(book.encode)(jnp.asarray(x)))
    np.testing.assert_array_equal(got, _compare_count(book, x))


def test_only_evenly_spaced_power_of_two_maps_get_closed_form():
    assert maps.SIGNED4.grid is None and maps.SIGNED8.grid is None
    assert maps.CodeBook.of("thirds", np.array([0, 1, 2], np.float32) / 3).grid is None
    assert maps.CodeBook.of("eighths", np.arange(8, dtype=np.float32) / 8).grid == (16.0, 1.0)


@pytest.mark.parametrize("copy", [1, 3])
def test_table_copies_decode_identically(copy):
    idx = jnp.arange(256, dtype=jnp.int32)
    for book in (maps.SIGNED8, maps.UNSIGNED8):
        np.testing.assert_array_equal(book.decode(idx, copy=copy), book.values)


def test_sign_fix_index_rule_matches_values():
    for book in (maps.SIGNED8, maps.SIGNED4):
        i = np.arange(book.values.size)
        np.testing.assert_array_equal(i < book.negatives, book.values < 0)


def test_absmax_and_pack4():
    x = jax.random.normal(jax.random.key(0), (6, 4, 32)).at[0, 0, 3].set(-9.0)
    np.testing.assert_array_equal(bw.absmax(x), jnp.max(jnp.abs(x), axis=-1))
    np.testing.assert_array_equal(bw.absmax(x, 0), jnp.max(jnp.abs(x), axis=0))
    idx = jax.random.randint(jax.random.key(1), (3, 64), 0, 16)
    packed = bw.pack4(idx)
    np.testing.assert_array_equal(packed, (idx[:, 0::2] | (idx[:, 1::2] << 4)).astype(np.uint8))
    np.testing.assert_array_equal(bw.unpack4(packed), idx)


@pytest.mark.parametrize("factory", [optim.adamw_8bit, optim.adamw_fp8])
def test_compiled_step_writes_no_float32_moment(factory):
    n = 512
    tx = factory(1e-3)
    p = jnp.zeros((n, n))

    def step(p, s, g):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    s = jax.eval_shape(tx.init, p)
    hlo = jax.jit(step, donate_argnums=(0, 1)).lower(p, s, p).compile().as_text()
    entry = hlo[hlo.index("ENTRY") :]
    full = re.findall(r"= f32\[(?:512,512|512,2,256|262144,1)\]\{[^}]*\} (\S+)\(", entry)
    ops = [op for op in full if op != "parameter"]
    assert ops == ["fusion"], ops  # only the parameter update itself


@pytest.mark.parametrize("book", [maps.SIGNED8, maps.UNSIGNED8], ids=lambda b: b.name)
def test_merged_search_table_matches_bucket_then_midpoint(book):
    """One lookup of the merged table == bucket lookup followed by the midpoint comparison."""
    shift = book.shift
    b = np.arange(book.table.size, dtype=np.uint64)
    low = (b << shift).astype(np.uint32)
    high = (low | np.uint32((1 << shift) - 1)).astype(np.uint32)
    mids = book.cuts.view(np.uint32)
    rng = np.random.default_rng(1)
    pats = np.concatenate([
        low, high, low + 1, high - 1, mids, mids - 1, mids + 1,
        np.array([0, 0x80000000, 0x7F800000, 0xFF800000, 1, 0x80000001], np.uint32),
        rng.integers(0, 2**32, 2**20, dtype=np.uint64).astype(np.uint32),
    ]).astype(np.uint32)
    x = pats.view(np.float32)
    x = x[~np.isnan(x)]
    cand = book.table[x.view(np.uint32) >> shift].astype(np.int64)
    want = cand + (x > np.append(book.cuts, np.float32(np.inf))[cand])
    got = np.asarray(jax.jit(book.encode)(jnp.asarray(x)))
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got, _compare_count(book, x))


def test_e4m3_integer_rounding_matches_ml_dtypes():
    """The integer RNE cast to E4M3 == ml_dtypes' saturating cast, ties and subnormals included."""
    import ml_dtypes

    from jaxq.optim import codecs

    vals = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    vals = np.sort(vals[np.isfinite(vals)])
    mids = ((vals[:-1].astype(np.float64) + vals[1:]) / 2).astype(np.float32)  # exact ties
    pts = np.concatenate([vals, mids])
    near = [np.nextafter(pts, np.float32(-np.inf)), pts, np.nextafter(pts, np.float32(np.inf))]
    rng = np.random.default_rng(2)
    rand = rng.integers(0, 2**32, 2**21, dtype=np.uint64).astype(np.uint32).view(np.float32)
    specials = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, -np.nan, 1e-45, -1e-45, 500.0],
                        np.float32)
    x = np.concatenate([*near, rand, specials]).astype(np.float32)
    with np.errstate(invalid="ignore"):
        want = np.clip(x, -448, 448).astype(ml_dtypes.float8_e4m3fn).view(np.uint8)
    cast = jax.jit(lambda v: jax.lax.bitcast_convert_type(codecs._e4m3(v), jnp.uint8))
    np.testing.assert_array_equal(np.asarray(cast(jnp.asarray(x))), want)


def test_e4m3_values_match_ml_dtypes_on_every_pattern():
    """The arithmetic E4M3 decode == ml_dtypes, bit for bit (signed zero, subnormals, NaN)."""
    import ml_dtypes

    from jaxq.quantization.cast import e4m3_bits, e4m3_values

    pats = np.arange(256, dtype=np.uint8)
    want = pats.view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    got = np.asarray(jax.jit(e4m3_values)(jnp.asarray(pats)))
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
    finite = pats[np.isfinite(want)]
    back = np.asarray(e4m3_bits(jnp.asarray(want[finite])))
    np.testing.assert_array_equal(back, finite)  # e4m3_bits inverts it


def test_two_stage_column_max_matches_numpy():
    from jaxq.optim import codecs

    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 1024, 40)).astype(np.float32)
    x[0, :, 0] = -np.abs(x[0, :, 0])  # an all-negative column
    x[1, 7, 3] = np.float32(3.4e38)
    x[1, :, 5] = 0.0
    got = np.asarray(jax.jit(codecs._col_max)(jnp.asarray(x)))
    np.testing.assert_array_equal(got, x.max(axis=-2))
    small = x[:, :100]  # single-stage path
    np.testing.assert_array_equal(np.asarray(codecs._col_max(jnp.asarray(small))), small.max(-2))


def _run_steps(factory, params, grads, monkeypatch, strategy):
    """Three jitted steps of ``factory`` with the engine forced to ``strategy``."""
    import functools

    from jaxq.optim import adam, engine, momentum

    forced = functools.partial(engine.step_moments, strategy=strategy)
    monkeypatch.setattr(adam, "step_moments", forced)
    monkeypatch.setattr(momentum, "step_moments", forced)
    tx = factory()
    state = tx.init(params)
    step = jax.jit(lambda p, s, g: tx.update(g, s, p))
    out = []
    for g in grads:
        u, state = step(params, state, g)
        params = optax.apply_updates(params, u)
        out.append((u, state))
    return out


@pytest.mark.parametrize(
    "factory",
    [
        lambda: optim.adamw_8bit(1e-3, weight_decay=1e-2),
        lambda: optim.adamw_4bit(1e-3),
        lambda: optim.adamw_fp8(1e-3),
        lambda: optim.lion_8bit(1e-4),
        lambda: optim.sgd_8bit(1e-2, momentum=0.9, nesterov=True),
        lambda: optim.adamw_8bit(1e-3, scale_dtype=jnp.float32, block_size=64),
    ],
    ids=["adamw_8bit", "adamw_4bit", "adamw_fp8", "lion_8bit", "sgd_8bit", "adamw_8bit_f32_b64"],
)
def test_plain_and_recompute_strategies_agree_bitwise(factory, monkeypatch):
    """The GPU strategy (one decode -> step -> encode) == the CPU one, bit for bit."""
    rng = np.random.default_rng(7)
    shapes = {"w": (96, 640), "t": (2, 48, 256), "b": (8192,), "s": (64,)}
    params = {k: jnp.asarray(rng.standard_normal(s, np.float32)) for k, s in shapes.items()}
    grads = []
    for i in range(3):
        g = {k: rng.standard_normal(s).astype(np.float32) * 10.0 ** rng.integers(-6, 2)
             for k, s in shapes.items()}
        g["w"][:, :256] = 0.0  # all-zero blocks
        if i == 1:
            g["w"][3, 5], g["t"][1, 2, 3], g["b"][7] = np.nan, np.inf, -np.inf
            g["w"][4, :8] = 1e30
            g["b"][:64] = 1e-41  # subnormal gradients
        grads.append({k: jnp.asarray(v) for k, v in g.items()})
    plain = _run_steps(factory, params, grads, monkeypatch, "plain")
    fused = _run_steps(factory, params, grads, monkeypatch, "recompute")
    # XLA may contract multiply-adds differently in the two programs: float results agree
    # to a few ulp; codes agree except where such an ulp moves a value across a midpoint.
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(fused), strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        a, b = np.asarray(a), np.asarray(b)
        if a.dtype.itemsize == 1:  # codes (uint8, packed 4-bit, float8)
            assert np.mean(a.view(np.uint8) != b.view(np.uint8)) <= 1e-3
        else:
            a64, b64 = a.astype(np.float64), b.astype(np.float64)
            assert np.isfinite(a64).all() and np.isfinite(b64).all()
            np.testing.assert_allclose(a64, b64, rtol=1e-6, atol=1e-6 * np.abs(b64).max())


def test_strategy_is_chosen_per_platform_at_lowering():
    """CPU lowering keeps the OR-reduction encoder; a GPU lowering has none."""
    tx = optim.adamw_8bit(1e-3)
    p = jnp.zeros((512, 512))

    def step(p, s, g):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    s = jax.eval_shape(tx.init, p)
    traced = jax.jit(step).trace(p, s, p)
    cpu = traced.lower(lowering_platforms=("cpu",)).as_text()
    gpu = traced.lower(lowering_platforms=("cuda",)).as_text()
    assert "stablehlo.or" in cpu
    assert "stablehlo.or" not in gpu


def test_unknown_strategy_raises():
    from jaxq.optim import engine

    with pytest.raises(ValueError, match="strategy"):
        engine.step_moments({}, ({},), lambda nd: (), lambda g, m: (g, m), strategy="fast")
