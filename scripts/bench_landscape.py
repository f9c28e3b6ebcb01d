"""What `autograd-lab landscape` costs on SmallNet: a short synthetic SmallNet run (with a few
ModelCheckpoint files, so the plane has a trajectory), then a 51-point line from its initial to
its final weights and a 25x25 random plane through its final weights, both over 2,048 examples
of each split (train and val), timed end to end (model, data, checkpoints, evaluation, files).
Targets on a 2-core machine: line under 10 s, plane under 60 s.

    python scripts/bench_landscape.py [--keep DIR] [--steps 400] [--threads N]

Not a test (no timing assertions in the suite): it prints the seconds next to the targets and
the machine's load (`uptime`).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, default=None, help="keep the run here")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: "
                        "torch's, the number of cores)")
    parser.add_argument("--device", default=None)
    args = parser.parse_args()

    import torch

    import autograd_lab.api as al

    if args.threads:
        torch.set_num_threads(args.threads)
    base = args.keep or Path(tempfile.mkdtemp(prefix="bench_landscape_"))
    run_dir = base / "smallnet"
    overrides = ["data=synthetic", f"data.root={base / 'data'}", "data.train_size=8192",
                 "data.test_size=2048", f"trainer.max_steps={args.steps}", "probes=off",
                 "callbacks=[model_checkpoint]",
                 f"callbacks.model_checkpoint.every_n_train_steps={max(args.steps // 8, 1)}"]
    t = time.perf_counter()
    r = al.run(overrides, run_dir=run_dir)
    print(f"trained {run_dir} ({r.status}, {args.steps} steps) in {time.perf_counter() - t:.1f} s")

    common = {"examples": 2048, "progress": False, "device": args.device}
    results = []
    for what, kwargs, target in (("line: 51 points, initial -> final", {"points": 51}, 10.0),
                                 ("plane: 25x25 random, filter-normalised",
                                  {"plane": True, "grid": 25}, 60.0)):
        t = time.perf_counter()
        s = al.landscape(run_dir, **kwargs, **common)
        seconds = time.perf_counter() - t
        results.append((what, len(s.frame), seconds, target))
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} cores; {load}")
    for what, n, seconds, target in results:
        verdict = "OK" if seconds < target else "OVER"
        print(f"  {what}: {n} points evaluated on 2048 train + 2048 val examples: "
              f"{seconds:.1f} s (target < {target:.0f} s) {verdict}")
    print(f"outputs: {run_dir / 'landscape'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
