"""The built wheel ships ``kernels/`` as ``jaxq.kernels`` and imports from a fresh venv."""

import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_installs_and_imports_kernels(tmp_path):
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(dist), str(ROOT)],
        check=True, cwd=tmp_path,
    )  # fmt: skip
    (wheel,) = dist.glob("jaxq-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "jaxq/kernels/__init__.py" in names
    assert not any(n.startswith("kernels/") for n in names)

    env_dir = tmp_path / "fresh"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = env_dir / "bin" / "python"
    subprocess.run([py, "-m", "pip", "install", "--no-deps", "-q", str(wheel)], check=True)
    # Dependencies (jax, flax, ...) come from this environment, appended after the fresh
    # venv's own site-packages, so jaxq itself can only come from the installed wheel.
    site = subprocess.run(
        [py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    Path(site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    out = subprocess.run(
        [py, "-c", "import jaxq, jaxq.kernels; print(jaxq.__file__); "
         "print(jaxq.kernels.__file__); print(jaxq.kernels.backend())"],
        check=True, capture_output=True, text=True, cwd=tmp_path,
    ).stdout.split()  # fmt: skip
    assert out[0].startswith(str(env_dir)) and out[1].startswith(str(env_dir))
    assert out[1].endswith("jaxq/kernels/__init__.py") and out[2] == "cpu"
    assert (env_dir / "bin" / "jaxq").exists()  # the console script
