# The README's commands. Each target sets up what it needs; set-up runs once (stamp file).
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
export OMP_NUM_THREADS ?= 2

.PHONY: setup demo test bench lint docs clean notebooks lab

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

# Two test processes (one per core of a 2-core machine), one torch thread each: a process with
# two threads slows many times over when another holds a core. A test file runs in one process
# (its module fixtures are made once; the local SLURM cluster is started once). Files start in
# collection order, the longest first (tests/conftest.py), so both processes end together.
test: setup
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=15

bench: setup
	$(BIN)/python scripts/bench_throughput.py --threads 1
	$(BIN)/python scripts/bench_throughput.py --threads 2

# docs/architecture.md's diagram, read from the source (tests/test_structure.py checks it is current)
docs: setup
	$(BIN)/python scripts/architecture.py

lint: setup
	$(BIN)/ruff check src tests scripts

# The project's Jupyter kernel (this venv's Python), registered inside the venv on first use.
# The kernel's own log is kept to critical errors (a notebook's errors still fail the run, with
# their traceback): at the end of every execution jupyter_client interrupts the kernel (SIGINT)
# before asking it to shut down, and a kernel still inside a message handler then logs
# "[IPKernelApp] ERROR | KeyboardInterrupt caught in kernel" although nothing failed (now and
# then, a race); ipykernel 7 also warns at every start that it talks TCP on 127.0.0.1 unencrypted.
KERNEL := $(VENV)/share/jupyter/kernels/autograd-lab/kernel.json
$(KERNEL): $(STAMP) Makefile
	$(BIN)/python -m ipykernel install --sys-prefix --name autograd-lab \
	  --display-name "Python (autograd-lab)" >/dev/null
	$(BIN)/python -c "import json, sys; k = json.load(open(sys.argv[1])); \
	  k['argv'].append('--IPKernelApp.log_level=CRITICAL'); \
	  json.dump(k, open(sys.argv[1], 'w'), indent=1)" $(KERNEL)

# Execute both notebooks into notebooks/executed/ (git-ignored). SWEEP_DIR=<folder> points
# sweep_analysis at a sweep of yours; without it the notebook runs two small sweeps itself.
notebooks: setup $(KERNEL)
	mkdir -p notebooks/executed
	$(BIN)/jupyter nbconvert --to notebook --execute --output-dir notebooks/executed \
	  --ExecutePreprocessor.kernel_name=autograd-lab --ExecutePreprocessor.timeout=3600 \
	  notebooks/autograd_tour.ipynb
	$(BIN)/papermill --no-progress-bar -k autograd-lab notebooks/sweep_analysis.ipynb \
	  notebooks/executed/sweep_analysis.ipynb $(if $(SWEEP_DIR),-p SWEEP_DIR '$(SWEEP_DIR)')

# JupyterLab on 127.0.0.1 with the project's kernel (JupyterLab is installed on first use).
lab: setup $(KERNEL)
	test -x $(BIN)/jupyter-lab || $(BIN)/pip install -q jupyterlab
	$(BIN)/jupyter lab --ip=127.0.0.1 $(if $(filter 0,$(shell id -u)),--allow-root) notebooks/

clean:
	rm -rf $(VENV) runs multirun
