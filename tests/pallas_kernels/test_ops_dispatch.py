"""jaxq.ops' products on the kernels: the dispatch, run in interpret mode on CPU.

``JAXQ_KERNELS=interpret`` makes :func:`jaxq.ops.operand.matmul` hand weight-only, W4A8,
blockwise-FP8 and MXFP8 products to their Pallas kernels in interpret mode; without it (on CPU)
the same calls stay on XLA. Both must give the recipe's product within the kernel's
tolerance, forward and backward, under ``jit``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxq
from jaxq import recipes as R
from jaxq.ops import Quantizer, Recipe
from jaxq.ops import operand as O
from jaxq.ops.kernel_dispatch import kernel_product

DN = (((2,), (0,)), ((), ()))

CASES = {
    # weight-only INT4 g64 (W4A16): the weight-only GEMM
    "w4a16": (Recipe("w4a16", None, Quantizer("int4", "block", 64), None), "jaxq_weight_only"),
    # weight-only MXFP4 and NVFP4: the same kernel, decoding E8M0 / E4M3 block scales
    "w_mxfp4": (Recipe("w_mxfp4", None, Quantizer("mxfp4", "block"), None), "jaxq_weight_only"),
    "w_nvfp4": (Recipe("w_nvfp4", None, Quantizer("nvfp4", "block"), None), "jaxq_weight_only"),
    # E4M3 per-tensor activations x INT4 g128 weights (FireQ's W4A8)
    "w4a8": (R.Int4(block_size=128, learned_step=False, activations="e4m3"), "jaxq_w4a8"),
    # DeepSeek-V3: 1x128 activation tiles x 128x128 weight blocks
    "fp8_blockwise": (R.FP8Blockwise(), "jaxq_fp8_blockwise"),
    # MXFP8, forward and input gradient (MX x MX along K): the FP8 GEMM's 32-wide steps
    "mxfp8": (R.MXFP8(), "jaxq_fp8_mx"),
    # MXFP4 on both operands: the FP4 GEMM (scaled elements exact in bfloat16 MMAs);
    # NVFP4 with 1x16 weight blocks likewise, and with 16x16 weight tiles, which are 1x16
    # blocks of the transposed weight in the input gradient
    "mxfp4": (R.MXFP4(stochastic_rounding_grads=False), "jaxq_fp4_mxfp4"),
    "nvfp4": (R.NVFP4(random_hadamard=False, stochastic_rounding_grads=False,
                      weight_blocks_2d=False), "jaxq_fp4_nvfp4"),
    "nvfp4_tiles": (R.NVFP4(random_hadamard=False, stochastic_rounding_grads=False),
                    "jaxq_fp4_nvfp4"),
}
# the input and the weight gradient on the kernel too (the weight gradient's operands,
# quantized in blocks along the tokens, transposed as codes)
BACKWARD_ON_KERNELS = {"fp8_blockwise", "mxfp8", "mxfp4", "nvfp4", "nvfp4_tiles"}


def _operands(seed=0):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(k1, (3, 40, 256))  # 120 tokens: not a multiple of the tiles
    w = jax.random.normal(k2, (256, 384)) * 0.05  # N = 384: three 128-blocks, not a tile
    g = jax.random.normal(k3, (3, 40, 384))
    return x, w, g


def _run(recipe):
    x, w, g = _operands()

    @jax.jit
    def f(x, w):
        y, vjp = jax.vjp(lambda x, w: jaxq.ops.dot_general(x, w, DN, recipe=recipe), x, w)
        return (y, *vjp(g))

    return f(x, w), jax.make_jaxpr(f)(x, w)


@pytest.mark.parametrize("name", sorted(CASES))
def test_interpret_mode_routes_the_product_to_its_kernel(name, monkeypatch):
    recipe, kernel_name = CASES[name]
    (y_xla, dx_xla, dw_xla), jaxpr = _run(recipe)
    assert "pallas_call" not in str(jaxpr)  # CPU: XLA, unchanged
    monkeypatch.setenv("JAXQ_KERNELS", "interpret")
    (y, dx, dw), jaxpr = _run(recipe)
    assert kernel_name in str(jaxpr), f"no {kernel_name} pallas_call in the traced step"
    # each kernel's stated tolerance relative to sum |a.b| (float32 out): 1e-5; the
    # products here have |y| ~ sum|a.b| / 10, so 1e-4 of max |y| bounds it generously
    scale = float(jnp.max(jnp.abs(y_xla)))
    np.testing.assert_allclose(y, y_xla, rtol=0, atol=1e-4 * scale)
    if name in BACKWARD_ON_KERNELS:  # forward, input gradient, weight gradient
        assert str(jaxpr).count(f"name={kernel_name}") == 3, str(jaxpr).count(kernel_name)
        for d, d_xla in ((dx, dx_xla), (dw, dw_xla)):
            np.testing.assert_allclose(d, d_xla, rtol=0,
                                       atol=1e-4 * float(jnp.max(jnp.abs(d_xla))))  # fmt: skip
        return
    # the backward products do not use the kernels: unchanged
    np.testing.assert_array_equal(dx, dx_xla)
    np.testing.assert_array_equal(dw, dw_xla)


def test_no_kernel_for_other_layouts_or_batched_products(monkeypatch):
    monkeypatch.setenv("JAXQ_KERNELS", "interpret")
    x = jax.random.normal(jax.random.key(0), (2, 16, 256))
    # per-tensor FP8 stays with XLA's FP8 GEMM
    a = O.quantize_operand(x[:1], Quantizer("e4m3"))
    b = O.quantize_operand(x[1:], Quantizer("e4m3"))
    assert kernel_product(a, b) is None
    # a batch of two products: the FP8 kernels take 2-D operands
    blk = Quantizer("e4m3", "block", 128)
    assert kernel_product(O.quantize_operand(x, blk), O.quantize_operand(x, blk)) is None
    # float x float: nothing to do
    assert kernel_product(x, x) is None


def test_xla_forced_keeps_every_product_on_xla(monkeypatch):
    monkeypatch.setenv("JAXQ_KERNELS", "xla")
    _, jaxpr = _run(CASES["fp8_blockwise"][0])
    assert "pallas_call" not in str(jaxpr)
