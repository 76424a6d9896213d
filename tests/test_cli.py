"""Tests of the jaxq command line: the format table (`jaxq formats`)."""

import math
import re

import ml_dtypes
import numpy as np
import pytest

from jaxq.cli import main, parse_size
from jaxq.demo.formats_table import CASES, COLUMNS, float_sqnr_theory, make_data, sqnr_db

SIZE = "16K"


def _parse(out: str) -> dict[str, dict]:
    rows = {}
    for line in out.splitlines():
        if not line.startswith("| ") or line.startswith("| format"):
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = {
            "scales": cells[1],
            "bits": float(cells[2]),
            **{col: float(v) for col, v in zip(COLUMNS, cells[3:], strict=True)},
        }
    return rows


@pytest.fixture(scope="module")
def full_table():
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["formats", "--size", SIZE, "--seed", "0"]) == 0
    return buf.getvalue()


def test_every_format_has_a_row_with_bits_from_real_bytes(full_table):
    rows = _parse(full_table)
    assert list(rows) == [c.name for c in CASES]
    n = 16 * 1024
    # Independent count: element bits + scale bits per group (+ a 32-bit tensor scale).
    want = {
        "E4M3": 8 + 32 / n, "E5M2": 8 + 32 / n, "E2M3": 6 + 32 / n, "E2M1": 4 + 32 / n,
        "INT8 per-channel": 8 + 32 / 256, "INT4 g128": 4 + 32 / 128, "INT2 g64": 2 + 32 / 64,
        "NF4 g64": 4 + 32 / 64, "MXFP8": 8 + 8 / 32, "MXFP6_E2M3": 6 + 8 / 32,
        "MXFP4": 4 + 8 / 32, "NVFP4": 4 + 8 / 16 + 32 / n,
    }  # fmt: skip
    for name, bits in want.items():
        assert rows[name]["bits"] == pytest.approx(bits, abs=6e-3), name


def test_sqnr_values_are_sensible(full_table):
    rows = _parse(full_table)
    for col in COLUMNS[:4]:  # the four datasets
        assert rows["INT8 per-channel"][col] > rows["INT4 g128"][col] > rows["INT2 g64"][col]
    for col in COLUMNS:
        assert rows["MXFP8"][col] > rows["MXFP4"][col], col
        assert rows["E4M3"][col] > rows["E5M2"][col], col
    for d in ("gaussian", "laplace", "student-t3"):
        assert rows["INT8 per-channel"][d] > rows["INT4 g128"][d] + 15  # 4 more bits: ~24 dB
        assert rows["NF4 g64"][d] > rows["INT4 g128"][d]  # NF4 is built for bell curves
    # Per-tensor E4M3/E5M2 SQNR hardly depends on the distribution, and sits within a dB
    # of the log-uniform-mantissa theory (Gaussian mantissas are not quite log-uniform).
    assert abs(rows["E4M3"]["gaussian"] - float_sqnr_theory(3)) < 1.0
    assert abs(rows["E5M2"]["gaussian"] - float_sqnr_theory(2)) < 1.0
    # A per-row scale shared with outlier channels crushes the ordinary channels; MXFP8's
    # small blocks keep them.
    assert rows["INT8 per-channel"]["outliers: other ch."] < 15
    assert rows["MXFP8"]["outliers: other ch."] > 28


def test_e4m3_sqnr_matches_an_ml_dtypes_reference(full_table):
    rows = _parse(full_table)
    data, _ = make_data(16 * 1024, seed=0)
    for d in ("gaussian", "student-t3"):
        x = data[d].astype(np.float64)
        s = np.abs(x).max() / 448.0
        xhat = (x / s).astype(np.float32).astype(ml_dtypes.float8_e4m3fn).astype(np.float64) * s
        assert rows["E4M3"][d] == pytest.approx(sqnr_db(x, xhat), abs=0.06)


def test_theory_matches_a_log_uniform_simulation():
    rng = np.random.default_rng(1)
    x = np.exp2(rng.uniform(0, 6, size=200_000))  # log-uniform over 6 binades in range
    for fmt, m in ((ml_dtypes.float8_e4m3fn, 3), (ml_dtypes.float8_e5m2, 2)):
        xhat = x.astype(np.float32).astype(fmt).astype(np.float64)
        assert sqnr_db(x, xhat) == pytest.approx(float_sqnr_theory(m), abs=0.2)


def test_format_filter_and_determinism(capsys):
    assert main(["formats", "--size", "4K", "--format", "int8,e4m3", "--format", "NVFP4"]) == 0
    first = capsys.readouterr().out
    assert list(_parse(first)) == ["E4M3", "INT8 per-channel", "NVFP4"]
    assert main(["formats", "--size", "4K", "--format", "e4m3,int8,nvfp4"]) == 0
    second = capsys.readouterr().out

    def strip(s):
        return re.sub(r"\(\d+\.\d s\)", "", s)

    assert strip(first) == strip(second)
    assert main(["formats", "--size", "4K", "--format", "e4m3", "--seed", "1"]) == 0
    assert _parse(capsys.readouterr().out)["E4M3"] != _parse(first)["E4M3"]


def test_usage_errors(capsys):
    assert main(["formats", "--size", "4K", "--format", "float7"]) == 2
    assert "unknown format" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["formats", "--size", "1000"])
    assert e.value.code == 2
    assert "multiple of 256" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([])
    assert parse_size("64K") == 65536 and parse_size("1M") == 2**20 and parse_size("512") == 512


def test_sqnr_db_edges():
    assert sqnr_db(np.ones(4), np.ones(4)) == math.inf
    assert sqnr_db(np.array([3.0, 4.0]), np.zeros(2)) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="multiple of 256"):
        make_data(100, seed=0)
