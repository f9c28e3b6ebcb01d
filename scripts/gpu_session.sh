#!/usr/bin/env bash
# Issue 26's GPU measurements on a lent GPU machine (the device tool), in two short commands.
# The GPU image has torch, Lightning, pandas, pyarrow, matplotlib and TensorBoard, but not
# Hydra and its launchers: they travel as wheels in .whl/ (ignored by git, named in `carry`).
#
#   here, once:   scripts/gpu_session.sh prepare     # the wheels into .whl/ (about 0.5 MB)
#   there:        scripts/gpu_session.sh check       # gpu_check.py --only graph,stacked (~3 min)
#   there:        scripts/gpu_session.sh bench       # bench_gpu.py, every row (~5-8 min)
#
# Results (logs, JSON, the card's name and driver) go to $OUT (the device tool's folder that
# comes back), or ./gpu_out elsewhere. Not run on a GPU yet (2026-12-06).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUTDIR=${OUT:-gpu_out}
WHEELS=(hydra-core==1.3.8 omegaconf==2.3.1 hydra-joblib-launcher==1.2.0
        hydra-submitit-launcher==1.2.0 submitit==1.5.4 graphviz==0.21)

install() {  # the carried wheels and this checkout into the machine's Python, offline
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir .whl/*.whl
    "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e .
    mkdir -p "$OUTDIR"
    nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUTDIR/card.txt"
    "$PY" -c 'import torch; print("torch", torch.__version__)' | tee -a "$OUTDIR/card.txt"
}

case "${1:-}" in
prepare)
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    pip=${PIP:-.venv/bin/pip}
    "$pip" download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl "${WHEELS[@]}"
    "$pip" wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3  # an sdist on PyPI
    ls .whl
    ;;
check)
    install
    PYTHONUNBUFFERED=1 "$PY" scripts/gpu_check.py --only graph,stacked \
        --out "$OUTDIR/gpu_check.json" 2>&1 | tee "$OUTDIR/gpu_check.log"
    ;;
bench)
    install
    PYTHONUNBUFFERED=1 "$PY" scripts/bench_gpu.py --out "$OUTDIR/bench_gpu.json" 2>&1 \
        | tee "$OUTDIR/bench_gpu.log"
    ;;
*)
    echo "usage: scripts/gpu_session.sh prepare|check|bench" >&2
    exit 2
    ;;
esac
