# The two quick-start commands:  `make demo`  and  `make test`  (see README.md).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.medvlp-installed

.PHONY: demo test install system-deps lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[all]"
	touch $(STAMP)

install: $(STAMP)

## Install, then run the main job: the demo on the built-in synthetic cohort.
demo: $(STAMP)
	$(BIN)/medvlp demo --out demo-out

## Install (with the test extras and the Debian tools the tests use), then run the tests.
test: $(STAMP) system-deps
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

system-deps:
	bash .ci/system-deps.sh

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_cohort.py

clean:
	rm -rf demo-out .pytest_cache
