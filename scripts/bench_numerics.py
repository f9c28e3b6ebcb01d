"""How far bf16-mixed and compiled curves move from the float32 eager curve, on the seed's study.

Runs the zero-grad study (`autograd-lab train -m experiment=zero_grad_study`, SmallNet, batch 32,
SGD lr 0.001 momentum 0.9, train.zero_grad=true,false) three times as the CLI runs it, each a
fresh process: float32 eager (the reference), `trainer.precision=bf16-mixed`, and
`model.compile=true`. Then, per variant and per zero_grad setting, the relative difference of
the train/loss curve from the reference at each optimizer step, |v - ref| / |ref|: its maximum
and its value at the last step. Every step of every run is compared (the same seeds, the same
data order: only the arithmetic differs). A measurement, not a test.

    python scripts/bench_numerics.py                      # size=quick: 320 steps per run, CPU
    python scripts/bench_numerics.py --size full          # 5 epochs of 50,000 images (a GPU)
    python scripts/bench_numerics.py --accelerator gpu --seeds 0,1 --out-dir DIR

`--accelerator auto` (the default) trains on the GPU where there is one.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = {  # name -> overrides; the first is the reference
    "fp32 eager": [],
    "bf16-mixed": ["trainer.precision=bf16-mixed"],
    "compiled": ["model.compile=true"],
}


def cli() -> list[str]:
    exe = Path(sys.executable).parent / "autograd-lab"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "autograd_lab.cli"]


def run_study(name: str, overrides: list[str], args, out: Path) -> float:
    """One variant's sweep as the CLI runs it; returns its wall time in seconds."""
    size = ["size=quick"] if args.size == "quick" else ["data.train_size=50000"]
    cmd = [*cli(), "train", "-m", "experiment=zero_grad_study", "data=synthetic",
           f"data.root={args.data_root}", *size, f"seed={args.seeds}",
           f"trainer.accelerator={args.accelerator}", "probes=off",
           f"hydra.sweep.dir={out / name.replace(' ', '_')}", *overrides]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    seconds = time.perf_counter() - t0
    if proc.returncode:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        sys.exit(f"{name}: `{' '.join(cmd)}` exited {proc.returncode}:\n{tail}")
    return seconds


def curves(sweep_dir: Path) -> dict:
    """{(zero_grad, seed): (train/loss by step as a numpy array, run.json numerics, device)}."""
    import pandas as pd

    out = {}
    for record_file in sorted(sweep_dir.rglob("run.json")):
        record = json.loads(record_file.read_text())
        config = record["config"]
        frame = pd.read_parquet(record_file.parent / "metrics.parquet")
        loss = frame[frame.name == "train/loss"].sort_values("step")
        key = (config["train"]["zero_grad"], config["seed"])
        out[key] = (loss.value.to_numpy(), record.get("numerics"), record.get("device"))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=("quick", "full"), default="quick",
                   help="quick: the study's size=quick (5 epochs of 2,048 images, 320 steps); "
                        "full: 5 epochs of 50,000 synthetic images (7,815 steps)")
    p.add_argument("--seeds", default="0", help="comma list, e.g. 0,1,2")
    p.add_argument("--accelerator", default="auto", help="auto | cpu | gpu")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the runs")
    p.add_argument("--data-root", default=None, help="synthetic data folder (default: a temp)")
    p.add_argument("--out-dir", default=None, help="where the sweeps go (default: a temp)")
    args = p.parse_args()
    out = Path(args.out_dir or tempfile.mkdtemp(prefix="bench_numerics_"))
    args.data_root = str(Path(args.data_root or out / "data").resolve())

    import torch

    load = os.getloadavg()
    print(f"date {datetime.date.today()}  torch {torch.__version__}  cuda "
          f"{torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}  "
          f"cpus {os.cpu_count()}  load {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}  "
          f"size {args.size}  seeds {args.seeds}  out {out}", flush=True)
    results, walls = {}, {}
    for name, overrides in VARIANTS.items():
        walls[name] = run_study(name, overrides, args, out)
        results[name] = curves(out / name.replace(" ", "_"))
        some = next(iter(results[name].values()))
        print(f"  {name:11} {walls[name]:7.1f} s  device {some[2]}  numerics {some[1]}",
              flush=True)

    ref = results["fp32 eager"]
    print(f"\n{'variant':12} {'zero_grad':>9} {'seed':>4} {'steps':>5} {'final loss':>10} "
          f"{'fp32 final':>10} {'max rel diff':>12} {'final rel diff':>14}")
    for name, runs in results.items():
        if name == "fp32 eager":
            continue
        for key in sorted(runs, key=lambda k: (not k[0], k[1])):
            curve, base = runs[key][0], ref[key][0]
            if len(curve) != len(base):
                print(f"{name:12} {key[0]!s:>9} {key[1]:>4}  steps differ: {len(curve)} vs "
                      f"{len(base)}")
                continue
            rel = abs(curve - base) / abs(base)
            print(f"{name:12} {key[0]!s:>9} {key[1]:>4} {len(curve):5d} {curve[-1]:10.4f} "
                  f"{base[-1]:10.4f} {rel.max():12.2e} {rel[-1]:14.2e}"
                  f"{'   bitwise equal' if (curve == base).all() else ''}")
    load = os.getloadavg()
    print(f"\nload at the end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


if __name__ == "__main__":
    main()
