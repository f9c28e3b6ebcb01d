"""What the TensorBoard dashboard costs: the time each run spends writing its Custom Scalars
layout, its HParams and its backward graph (target: under 1 s a run), and how long
`autograd-lab tensorboard` takes to answer (target: within 10 s).

    python scripts/bench_dashboard.py [--data-root DIR]

Not a test (no timing assertions in the suite): it prints the numbers and the targets.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


def timed(module, name: str, spent: dict):
    """Wrap module.name so each call's wall time adds up in spent[name]."""
    original = getattr(module, name)

    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            spent[name] = spent.get(name, 0.0) + time.perf_counter() - t0

    setattr(module, name, wrapper)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", default=tempfile.mkdtemp(prefix="bench_dashboard_"))
    args = p.parse_args()

    import autograd_lab.job.recorder as recorder  # it calls the board's writers
    from autograd_lab.config.compose import compose
    from autograd_lab.observe.graph_view import TensorBoardGraph
    from autograd_lab.train import run

    work = Path(tempfile.mkdtemp(prefix="bench_dashboard_runs_"))
    results, spent, graphs = {}, {}, []
    timed(recorder, "write_layout", spent)
    timed(recorder, "write_hparams", spent)
    original_init = TensorBoardGraph.__init__

    def init(self, *a, **k):  # keep each run's graph writer: it times itself (.seconds)
        original_init(self, *a, **k)
        graphs.append(self)

    TensorBoardGraph.__init__ = init
    for model in ("smallnet", "resnet18"):
        spent.clear()
        graphs.clear()
        cfg = compose(["data=synthetic", f"data.root={args.data_root}", f"model={model}",
                       "data.train_size=256", "data.test_size=64", "trainer.max_epochs=1",
                       "trainer.progress_bar=false"])
        t0 = time.perf_counter()
        run(cfg, work / model, threads=1)
        wall = time.perf_counter() - t0
        graph_s = sum(getattr(g, "seconds", 0.0) or 0.0 for g in graphs)
        total = spent.get("write_layout", 0.0) + spent.get("write_hparams", 0.0) + graph_s
        results[model] = {"layout_ms": 1000 * spent.get("write_layout", 0.0),
                          "hparams_ms": 1000 * spent.get("write_hparams", 0.0),
                          "graph_ms": 1000 * graph_s, "total_ms": 1000 * total,
                          "run_s": wall}
        print(f"{model}: layout {results[model]['layout_ms']:.1f} ms, HParams "
              f"{results[model]['hparams_ms']:.1f} ms, graph {results[model]['graph_ms']:.1f} "
              f"ms: {total:.3f} s a run (target < 1 s); the whole run {wall:.1f} s", flush=True)

    exe = Path(sys.executable).parent / "autograd-lab"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.perf_counter()
    proc = subprocess.Popen([str(exe), "tensorboard", str(work), f"--port={port}"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        url = proc.stdout.readline().split()[1]
        while True:
            try:
                runs = json.load(urllib.request.urlopen(f"{url}data/runs", timeout=5))
                break
            except OSError:
                time.sleep(0.05)
        answered = time.perf_counter() - t0
    finally:
        proc.terminate()
        proc.wait(30)
    results["tensorboard_answers_s"] = answered
    print(f"autograd-lab tensorboard: answering {url} after {answered:.2f} s (target < 10 s); "
          f"runs {runs}")


if __name__ == "__main__":
    main()
