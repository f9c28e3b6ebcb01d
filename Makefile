# The README's commands. Each target sets up what it needs; set-up runs once (stamp file).
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
export OMP_NUM_THREADS ?= 2

.PHONY: setup demo test bench lint clean

setup: $(STAMP)

# Re-install only when the project's dependency list changes.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[test]'
	@command -v dot >/dev/null 2>&1 || { (apt-get update -qq && apt-get install -y -qq graphviz >/dev/null) \
	  || echo "note: could not install the graphviz binary; graphs fall back to DOT files"; }
	touch $(STAMP)

demo: setup
	$(BIN)/autograd-lab demo

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python scripts/bench_throughput.py --threads 1
	$(BIN)/python scripts/bench_throughput.py --threads 2

lint: setup
	$(BIN)/ruff check src tests scripts

clean:
	rm -rf $(VENV) runs multirun
