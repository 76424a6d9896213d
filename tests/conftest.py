"""Shared test setup: eight virtual CPU devices so sharding tests run in-process."""

import atexit
import os
import shutil
import tempfile


def _xla_flags() -> str:
    """Eight host devices, LLVM's optimization level 0 (``--xla_backend_optimization_level=0``)
    and, with jaxlib < 0.11, XLA:CPU's element-wise emitters in place of its MLIR fusion
    emitters (``--xla_cpu_use_fusion_emitters=false``).

    Compiling dominates this suite. Both flags act after XLA's HLO optimizations, on the
    code generation of the same optimized program: level 0 skips LLVM's optimization
    pipeline (about half the compile time of a small program), and on jaxlib 0.10 the MLIR
    fusion emitters are about a third of XLA:CPU's compile time. Measured on 2 cores
    (2026-12-02): the first pass 10.9 min against 14.7 min with XLA's defaults the same day,
    the second 7.6 min against 10.4 (2026-11-30). The price: loops are not vectorized, so
    the few run-bound tests (the short fidelity runs) would take about twice as long
    (``tests/xla_options.py`` compiles them at the default level), and the last bits of
    ``a * b + c``, ``tanh`` or a small matmul may differ from a default build
    (floating-point contraction and vectorized reductions); no test depends on those bits,
    and ``make fidelity``, ``make bench`` and ``make demo`` run with XLA's defaults.
    ``JAXQ_TEST_XLA_DEFAULTS=1`` keeps XLA's defaults for the suite too."""
    import importlib.metadata

    flags = "--xla_force_host_platform_device_count=8"
    if os.environ.get("JAXQ_TEST_XLA_DEFAULTS", "0") == "1":
        return flags
    flags += " --xla_backend_optimization_level=0"
    try:
        version = tuple(int(p) for p in importlib.metadata.version("jaxlib").split(".")[:2])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return flags
    return flags + (" --xla_cpu_use_fusion_emitters=false" if version < (0, 11) else "")


os.environ.setdefault("XLA_FLAGS", _xla_flags())
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Compiling dominates this suite, and many tests compile the same programs (the same model,
# step or quantizer in several tests and in both xdist workers). One run shares them through
# JAX's persistent compilation cache in a fresh directory, keyed by the program's HLO, the
# JAX version and the flags, so a hit is the program a compile would give. The controller
# creates the directory before it starts the workers, which inherit it (as do the example
# scripts the tests run), and removes it at exit. JAXQ_TEST_COMPILATION_CACHE=0 turns it off;
# a JAX_COMPILATION_CACHE_DIR already set is used as it is (and kept).
if os.environ.get("JAXQ_TEST_COMPILATION_CACHE", "1") != "0" and \
        "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # fmt: skip
    _CACHE_DIR = tempfile.mkdtemp(prefix="jaxq-test-jit-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE_DIR
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"
    atexit.register(shutil.rmtree, _CACHE_DIR, True)

# Long runs (end-to-end training steps, many-variant compiles) that the first pass of
# `make test` runs and the newest-JAX pass leaves out: they are marked `sweep` here, in one
# place, by node-id prefix. The second pass keeps at least one test of every mechanism.
SECOND_PASS_SKIPS = (
    "tests/scaled/test_gpt.py::",
    "tests/wrapping/test_linen.py::test_linen_train_step_threads_state",
    "tests/wrapping/test_linen.py::test_resnet_with_batchnorm_train_and_eval",
    "tests/scaled/test_transformer.py::test_fp8_gradients_within_budget",
    "tests/scaled/test_transformer.py::test_float16_gradients_match_float32[remat-",
    "tests/scaled/test_transformer.py::test_float16_gradients_match_float32[plain-unrolled]",
    "tests/ops/test_state_and_transforms.py::test_transformations[mxfp4]",
    "tests/ops/test_state_and_transforms.py::test_transformations[fp8_current]",
    "tests/ops/test_state_and_transforms.py::test_transformations[int8]",
    "tests/ops/test_state_and_transforms.py::test_hadamard_is_orthogonal",
    "tests/unit_scaling/test_fp8.py::test_fp8_training_short",
    "tests/unit_scaling/test_modules.py::test_decoder_is_unit_scaled_end_to_end",
    "tests/quantization/test_calibration.py::test_mse_search_beats_absmax",
    "tests/optim/test_reference.py::test_adamw_8bit_vs_optax_resynced_100_steps",
    "tests/optim/test_reference.py::test_fp8_second_moment_never_rounds_to_zero",
    "tests/optim/test_reference.py::test_lion_and_sgd_8bit_vs_float64_numpy",
    "tests/wrapping/test_nnx.py::test_learned_steps_are_params_and_train",
    "tests/models/test_train.py::test_train_reduces_loss_and_is_deterministic",
    "tests/ptq/test_algorithms.py::test_rotation_of_a_scanned_einsum_decoder",
    "tests/ptq/test_convert.py::test_linen_transformer_with_scan_equals_qat",
    "tests/kvcache/test_gpt_decode.py::test_greedy",
    "tests/wrapping/test_distributed.py::test_data_parallel_fsdp_step_matches_one_device",
    "tests/demo/test_demo.py::test_same_seed_same_run",
    "tests/quantization/test_quantize.py::test_zero_tensor_gives_finite_scales_and_zero_codes",
    "tests/quantization/test_quantize.py::test_tiny_amax_gets_the_smallest_normal_scale",
    "tests/scaled/test_transformer.py::test_float16_softmax_gradients[shape1-",
    "tests/ptq/test_convert.py::test_static_activation_calibrations_percentile_and_mse",
    "tests/ops/test_dot_general.py::test_stochastic_rounding_changes_with_the_step_and_is_unb",
)

# The converse: end-to-end runs of what a user runs as written (the example scripts, the
# README's quickstart, the installed wheel), marked `integration`. Where `make test` has a
# newest-JAX pass they run there only, on the JAX most users have; without one, the single
# pass runs them.
FIRST_PASS_SKIPS = (
    "tests/test_examples.py::",
    "tests/test_readme.py::",
    "tests/test_packaging.py::test_wheel_installs_and_imports_kernels",
)


# The cases of a parametrized test are shared between the two passes: they alternate, the
# even ones (the first included) on the second pass, marked `second_pass_case`, the odd ones
# on the first, `first_pass_case`. A test with two or more cases runs on both JAX versions
# and each case on one; a test with a single case runs on both. Cases that one pass leaves
# out anyway (`sweep`, `integration`) are not split.


def pytest_collection_modifyitems(config, items):
    import pytest

    def shared(item) -> bool:
        return getattr(item, "callspec", None) is not None and not (
            item.get_closest_marker("sweep") or item.get_closest_marker("integration"))

    for item in items:
        if item.nodeid.startswith(SECOND_PASS_SKIPS):
            item.add_marker(pytest.mark.sweep)
        if item.nodeid.startswith(FIRST_PASS_SKIPS):
            item.add_marker(pytest.mark.integration)
    cases: dict[str, int] = {}
    for item in items:
        if shared(item):
            function = item.nodeid.split("[", 1)[0]
            cases[function] = cases.get(function, 0) + 1
    seen: dict[str, int] = {}
    for item in items:
        if not shared(item):
            continue
        function = item.nodeid.split("[", 1)[0]
        i = seen[function] = seen.get(function, -1) + 1
        if cases[function] > 1:
            item.add_marker(pytest.mark.first_pass_case if i % 2 else pytest.mark.second_pass_case)
