# capsbench — every target sets up .venv first, so `make test` works on a fresh clone.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
NAME   ?= demo
ARGS   ?=

export MLFLOW_DISABLE_TELEMETRY := true

.PHONY: setup setup-scale test test-slow test-scale lint bench demo study report ui clean

setup: $(STAMP)  ## create .venv and install capsbench (editable) with its dev extra

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

setup-scale: $(VENV)/.installed-scale  ## setup + the PostgreSQL driver for many machines (README "Scaling out")

$(VENV)/.installed-scale: $(STAMP)
	$(PY) -m pip install --quiet -e '.[dev,scale]'
	touch $@

test: setup  ## the default test suite (no slow tests)
	$(PY) -m pytest -q

test-slow: setup  ## only the slow tests
	$(PY) -m pytest -q -m slow

test-scale: setup-scale  ## the many-machines tests against throw-away PostgreSQL + MLflow servers
	bash .ci/with-scale-servers $(PY) -m pytest -q -m postgres

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

bench: setup  ## training/inference throughput and memory, fast path vs the plain reference
	$(PY) -m harness.bench $(ARGS)

study: setup  ## run a whole study: make study NAME=smallnorb_azimuth ARGS="--workers 2"
	$(PY) -m harness.study $(NAME) $(ARGS)

report: setup  ## regenerate a study's report: make report NAME=demo
	$(PY) -m harness.report $(NAME) $(ARGS)

demo: setup  ## offline end-to-end demo: small synthnorb, the demo study, its report (it prints both links)
	$(PY) -m harness.study demo $(ARGS)

ui: setup  ## browse runs: mlflow ui on the project's store
	$(PY) -m harness.tracking ui

clean:
	rm -rf $(VENV) .pytest_cache
