# Every target sets up its own virtualenv: a fresh machine needs only Python and pip.
PYTHON ?= python3
# Resolve the interpreter; fall back to a pyenv install when the shim is not activated.
PYBIN := $(shell $(PYTHON) -c 'import sys; print(sys.executable)' 2>/dev/null || \
	ls -d $$(pyenv root 2>/dev/null)/versions/$(patsubst python%,%,$(PYTHON))*/bin/python 2>/dev/null | tail -n 1)
VENV ?= $(if $(filter python3,$(PYTHON)),.venv,.venv-$(notdir $(PYTHON)))
BIN := $(VENV)/bin
STAMP := $(VENV)/.jaxq-installed

.PHONY: test demo fidelity bench lint clean

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
	$(BIN)/python -m pytest -q -n 2 -m "not fidelity" --doctest-modules tests jaxq kernels

fidelity: $(STAMP)
	$(BIN)/python -m pytest -q -m "fidelity"

demo: $(STAMP)
	$(BIN)/jaxq demo

bench: $(STAMP)
	$(BIN)/python benchmarks/quantize.py
	$(BIN)/python benchmarks/optim.py
	$(BIN)/python benchmarks/scaling.py
	$(BIN)/python benchmarks/umup_transfer.py
	$(BIN)/python benchmarks/ops.py

clean:
	rm -rf .venv .venv-* build dist *.egg-info .pytest_cache .ruff_cache .hypothesis
