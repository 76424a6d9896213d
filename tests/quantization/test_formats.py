import ml_dtypes
import numpy as np
import pytest

from jaxq import formats as F

FLOATS = [F.E4M3, F.E5M2, F.E2M3, F.E3M2, F.E2M1, F.E8M0]


@pytest.mark.parametrize("fmt", FLOATS, ids=lambda f: f.name)
def test_float_format_constants_match_ml_dtypes(fmt):
    fi = ml_dtypes.finfo(fmt.dtype)
    assert fmt.max == float(fi.max)
    assert fmt.min_normal == float(fi.smallest_normal)
    assert fmt.min_subnormal == float(fi.smallest_subnormal)
    assert fmt.bits == fi.bits
    assert fmt.has_inf == bool(np.isinf(np.array(np.inf, np.float32).astype(fmt.dtype)))
    assert fmt.values().max() == fmt.max


def test_bits_and_levels():
    assert [f.bits for f in (F.INT8, F.INT4, F.INT2, F.NF4)] == [8, 4, 4 - 2, 4]
    assert (F.INT4.qmin, F.INT4.qmax, F.UINT2.qmax) == (-7, 7, 3)
    assert len(set(F.NF4_LEVELS)) == 16 and F.NF4_LEVELS[7] == 0.0
    assert (F.MXFP8.bits_per_element, F.MXFP4.bits_per_element) == (8.25, 4.25)
    assert F.NVFP4.block_size == 16 and F.NVFP4.scale_format is F.E4M3


@pytest.mark.parametrize(
    "name,fmt",
    [("e4m3", F.E4M3), ("float8_e4m3fn", F.E4M3), ("E5M2", F.E5M2), ("float6_e2m3fn", F.E2M3),
     ("mxfp4", F.MXFP4), ("nvfp4", F.NVFP4), ("int4", F.INT4), ("nf4", F.NF4),
     ("float8_e8m0fnu", F.E8M0), ("mxfp6_e3m2", F.MXFP6_E3M2)],
)
def test_get_by_name(name, fmt):
    assert F.get(name) is fmt
    assert F.get(fmt) is fmt


def test_get_unknown_lists_valid_names():
    with pytest.raises(ValueError, match="valid names:.*e4m3"):
        F.get("fp3")
    with pytest.raises(TypeError):
        F.get(8)


def test_formats_are_hashable_and_frozen():
    assert len({F.E4M3, F.get("e4m3"), F.MXFP4}) == 2
    with pytest.raises(AttributeError):
        F.E4M3.max = 1.0
