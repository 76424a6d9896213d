"""Every Triton kernel is called on whole tiles only.

Pallas's Triton backend neither masks nor bounds-checks a block that runs past the end of
its array: a partial tile reads past the end and, in a row-major array, writes its extra
columns into the next row. Interpret mode pads such blocks, so the interpret-mode tests
cannot see it. Here each kernel is traced (not run) on ragged shapes, and every block
shape of every ``pallas_call`` must divide its array (the wrappers pad and slice); the
4-bit Adam kernel, which masks its loads and stores itself, is the one exception.
"""

import functools

import jax
import jax.numpy as jnp
import pytest
from jaxq.kernels import fused_adam, fused_adam_4bit

from jaxq import kernels
from jaxq.optim import maps

from .common import pallas_calls, partial_blocks, random_qarray

MASKED = ("jaxq_adam4_",)  # kernels that mask their partial tiles with plt.load/plt.store


def _weight_only(fmt, group, m, n, k, batch=()):
    w = random_qarray(fmt, group, (*batch, n, k))
    x = jnp.ones((*batch, m, k), jnp.bfloat16)
    return functools.partial(kernels.weight_only_matmul, implementation="triton",
                             interpret=True), (x, w)  # fmt: skip


def _fp4_operand(fmt, rows, k):
    from jaxq import formats as F
    from jaxq.quantization.qarray import Layout, QArray

    f = F.get(fmt)
    scale = jnp.ones((rows, k // f.block_size), f.scale_format.dtype)
    return QArray(jnp.zeros((rows, k // 2), jnp.uint8), scale, None,
                  jnp.float32(1.0) if f.tensor_scale else None, f, (rows, k),
                  jnp.dtype("float32"), Layout("block", (1,), f.block_size))  # fmt: skip


def _block_fp4(fmt, m, n, k):
    return functools.partial(kernels.weight_only_matmul, implementation="triton",
                             interpret=True), (jnp.ones((m, k), jnp.bfloat16),
                                               _fp4_operand(fmt, n, k))  # fmt: skip


def _fp8(mode, m, n, k):
    group = {"rowwise": None, "blockwise": 128}[mode]
    a, b = random_qarray("e4m3", group, (m, k), 1), random_qarray("e4m3", group, (n, k), 2)
    return functools.partial(kernels.scaled_fp8_matmul, with_amax=True, implementation="triton",
                             interpret=True), (a, b)  # fmt: skip


def _fp4(fmt, m, n, k):
    return functools.partial(kernels.fp4_matmul, implementation="triton", interpret=True), (
        _fp4_operand(fmt, m, k), _fp4_operand(fmt, n, k))


def _w4a8(m, n, k, group):
    x = random_qarray("e4m3", "tensor", (m, k), 1)
    w = random_qarray("int4", group, (n, k), 2)
    return functools.partial(kernels.w4a8_matmul, implementation="triton",
                             interpret=True), (x, w)  # fmt: skip


def _adam(rows, n, bs, four_bit=False):
    mod = fused_adam_4bit if four_bit else fused_adam
    per = 2 if four_bit else 1
    g = jnp.ones((rows, n))
    codes = jnp.zeros((rows, n // per), jnp.uint8)
    scale = jnp.zeros((rows, n // bs), jnp.float32)
    hyper = mod.hyperparameters(0.9, 0.999, 1e-8, count=1)
    kw = (dict(m_map=maps.SIGNED4, v_map=maps.LINEAR4) if four_bit
          else dict(m_map=maps.SIGNED8, v_map=maps.UNSIGNED8))  # fmt: skip
    return functools.partial(mod.adam_update, **kw, implementation="triton",
                             interpret=True), (g, codes, scale, codes, scale, hyper)  # fmt: skip


CASES = {
    "weight_only int4 g32, M=5 N=100": lambda: _weight_only("int4", 32, 5, 100, 96),
    "weight_only int8 rows, M=7 N=40": lambda: _weight_only("int8", None, 7, 40, 64),
    "weight_only nf4 g64, M=300 N=72 batched": lambda: _weight_only("nf4", 64, 300, 72, 128, (2,)),
    "weight_only mxfp4, M=3 N=100": lambda: _block_fp4("mxfp4", 3, 100, 64),
    "weight_only nvfp4, M=17 N=24": lambda: _block_fp4("nvfp4", 17, 24, 64),
    "fp8 rowwise, M=20 N=70": lambda: _fp8("rowwise", 20, 70, 384),
    "fp8 blockwise, M=33 N=200": lambda: _fp8("blockwise", 33, 200, 256),
    "w4a8 rows, M=5 N=100": lambda: _w4a8(5, 100, 128, None),
    "fp4 mxfp4, M=5 N=100": lambda: _fp4("mxfp4", 5, 100, 96),
    "fp4 nvfp4, M=300 N=72": lambda: _fp4("nvfp4", 300, 72, 64),
    "w4a8 g128, M=300 N=72": lambda: _w4a8(300, 72, 256, 128),
    "cast_transpose 37x100": lambda: (functools.partial(
        kernels.cast_transpose, implementation="triton", interpret=True),
        (jnp.ones((37, 100)),)),
    "block_quantize mxfp8 37x96": lambda: (functools.partial(
        kernels.block_quantize, fmt="mxfp8", implementation="triton", interpret=True),
        (jnp.ones((37, 96)),)),
    "block_quantize nvfp4 5x48": lambda: (functools.partial(
        kernels.block_quantize, fmt="nvfp4", implementation="triton", interpret=True),
        (jnp.ones((5, 48)),)),
    "cast_transpose mosaic_tpu 37x300": lambda: (functools.partial(
        kernels.cast_transpose, fmt="e5m2", implementation="mosaic_tpu", interpret=True),
        (jnp.ones((37, 300)),)),
    "block_quantize mxfp4 mosaic_tpu 37x4160": lambda: (functools.partial(
        kernels.block_quantize, fmt="mxfp4", implementation="mosaic_tpu", interpret=True),
        (jnp.ones((37, 4160)),)),
    "block_quantize nvfp4 mosaic_tpu 5x48": lambda: (functools.partial(
        kernels.block_quantize, fmt="nvfp4", implementation="mosaic_tpu", interpret=True),
        (jnp.ones((5, 48)),)),
    "adam 8-bit, 15 rows": lambda: _adam(15, 512, 256),
    "adam 4-bit, 21 rows": lambda: _adam(21, 256, 128, four_bit=True),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_pallas_call_gets_whole_tiles(name):
    fn, args = CASES[name]()
    calls = pallas_calls(fn, *args)
    assert calls, f"{name}: no pallas_call traced"
    for eqn in calls:
        kname = str(eqn.params.get("name_and_src_info", eqn.params.get("name", "")))
        if any(k in kname for k in MASKED):
            continue
        assert not partial_blocks(eqn), f"{name} ({kname}): {partial_blocks(eqn)}"


def test_the_check_sees_a_partial_tile():
    from jax.experimental import pallas as pl

    def k(x_ref, o_ref):
        o_ref[...] = x_ref[...]

    spec = pl.BlockSpec((16, 64), lambda i, j: (i, j))
    f = pl.pallas_call(k, out_shape=jax.ShapeDtypeStruct((5, 100), jnp.float32), grid=(1, 2),
                       in_specs=[spec], out_specs=spec, interpret=True)  # fmt: skip
    (eqn,) = pallas_calls(f, jnp.ones((5, 100)))
    assert partial_blocks(eqn) == ["(5, 100) in blocks (16, 64)"] * 2
