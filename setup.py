"""Maps the top-level ``kernels/`` directory to the ``jaxq.kernels`` package.

Everything else lives in ``pyproject.toml``; this file only exists because the package
list must be computed: ``jaxq`` and its subpackages come from ``jaxq/``, and
``jaxq.kernels`` and its subpackages come from ``kernels/``.
"""

from setuptools import find_packages, setup

packages = find_packages(include=["jaxq", "jaxq.*"])
packages += ["jaxq.kernels"] + ["jaxq.kernels." + p for p in find_packages(where="kernels")]

setup(packages=packages, package_dir={"jaxq": "jaxq", "jaxq.kernels": "kernels"})
