# Every target sets up its own virtualenv: a fresh machine needs only Python and pip.
PYTHON ?= python3
# Resolve the interpreter; fall back to a pyenv install when the shim is not activated.
PYBIN := $(shell $(PYTHON) -c 'import sys; print(sys.executable)' 2>/dev/null || \
	ls -d $$(pyenv root 2>/dev/null)/versions/$(patsubst python%,%,$(PYTHON))*/bin/python 2>/dev/null | tail -n 1)
VENV ?= $(if $(filter python3,$(PYTHON)),.venv,.venv-$(notdir $(PYTHON)))
BIN := $(VENV)/bin
STAMP := $(VENV)/.jaxq-installed

# `make test` runs the suite twice when a Python >= 3.12 exists: with $(PYTHON) (the JAX
# pinned by what pip picks there, 0.10.2 on 3.11), then with the newest such interpreter
# (pyenv's 3.13/3.12 first, then python3.13/python3.12 on PATH) and the newest JAX pip
# gives it, each in a virtualenv of its own. The second pass leaves out the numeric sweeps
# over recipes and the short end-to-end training runs (marker `sweep`), which the first pass
# runs; the first leaves out the example scripts, the README quickstart and the wheel
# install (marker `integration`), which the second runs on the JAX most users have. The
# cases of a parametrized test alternate between the passes, so a test with several cases
# runs on both (markers `first_pass_case`, `second_pass_case`; tests/conftest.py).
# Without a second interpreter the one pass runs everything.
PYENV_ROOT ?= $(shell pyenv root 2>/dev/null || echo $$HOME/.pyenv)
NEWEST_PYTHON ?= $(shell for v in 3.13 3.12; do \
	p=$$(ls -d $(PYENV_ROOT)/versions/$$v*/bin/python 2>/dev/null | tail -n 1); \
	test -n "$$p" || p=$$(command -v python$$v 2>/dev/null); \
	if test -n "$$p" && $$p -c 'import venv' 2>/dev/null; then echo $$p; break; fi; done)
PYVER = $(shell $(1) -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)
NEWEST_VER := $(if $(NEWEST_PYTHON),$(call PYVER,$(NEWEST_PYTHON)))
SECOND := $(if $(filter-out $(call PYVER,$(PYBIN)),$(NEWEST_VER)),$(NEWEST_PYTHON))
PYTEST_SUITE = -q -n 2 --dist worksteal -m "not fidelity" --doctest-modules tests jaxq kernels

.PHONY: test suite demo fidelity bench lint clean

$(STAMP): pyproject.toml setup.py
	@test -n "$(PYBIN)" || (echo "cannot find interpreter '$(PYTHON)'" && exit 1)
	test -x $(BIN)/python || $(PYBIN) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -c 'import jax, sys; print("suite: Python", sys.version.split()[0], "jax", jax.__version__)'
	$(BIN)/python -m pytest $(if $(SECOND),$(subst "not fidelity","not fidelity and not integration and not second_pass_case",$(PYTEST_SUITE)),$(PYTEST_SUITE))
ifneq ($(SECOND),)
	$(MAKE) --no-print-directory suite PYTHON=$(SECOND) VENV=.venv-python$(NEWEST_VER) \
		PYTEST_SUITE='$(subst "not fidelity","not fidelity and not sweep and not first_pass_case",$(PYTEST_SUITE))'
endif

# the suite alone, in $(VENV) (used by `test` for the second interpreter)
suite: $(STAMP)
	$(BIN)/python -c 'import jax, sys; print("suite: Python", sys.version.split()[0], "jax", jax.__version__)'
	$(BIN)/python -m pytest $(PYTEST_SUITE)

fidelity: $(STAMP)
	JAXQ_TEST_XLA_DEFAULTS=1 $(BIN)/python -m pytest -q -m "fidelity"

demo: $(STAMP)
	$(BIN)/jaxq demo

bench: $(STAMP)
	$(BIN)/python benchmarks/quantize.py
	$(BIN)/python benchmarks/optim.py
	$(BIN)/python benchmarks/scaling.py
	$(BIN)/python benchmarks/umup_transfer.py
	$(BIN)/python benchmarks/ops.py
	$(BIN)/python benchmarks/ptq.py
	$(BIN)/python benchmarks/kvcache.py
	$(BIN)/python benchmarks/lora.py
	$(BIN)/python benchmarks/flax_train.py
	$(BIN)/python benchmarks/kernels.py

clean:
	rm -rf .venv .venv-* build dist *.egg-info .pytest_cache .ruff_cache .hypothesis
