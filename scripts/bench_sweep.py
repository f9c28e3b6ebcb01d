"""Sweep throughput on this machine: Hydra's basic launcher against joblib with 2 jobs and
against the stacked launcher (all seeds as one vmapped program).

8 SmallNet jobs of 300 steps each (synthetic data, no validation, probes off), launched through
the real CLI, timed end to end, side by side in one invocation:

  basic   jobs one after another in one process (imports paid once), torch's default threads
  joblib  hydra/launcher=joblib n_jobs=2, one torch thread per job (the harness sets it)
  stacked hydra/launcher=stacked: the 8 seeds as one program in one process (a GPU's case;
          on 2 CPU cores it is expected to be no faster)

Per-job overhead of the basic launcher beyond training = ((T8 - T1) / 7) - mean training time,
where T8 and T1 are the wall times of an 8-job and a 1-job sweep. A measurement, not a test.

    python scripts/bench_sweep.py [--jobs 8] [--steps 300] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

EXE = Path(sys.executable).parent / "autograd-lab"


def sweep(jobs: int, steps: int, data_root: Path, launcher: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "sweep"
        seeds = ",".join(str(s) for s in range(jobs))
        cmd = [str(EXE), "train", "-m", *launcher, "data=synthetic", f"data.root={data_root}",
               f"data.train_size={steps * 32}", "trainer.max_epochs=1",
               "trainer.limit_val_batches=0", "probes=off", f"seed={seeds}",
               f"hydra.sweep.dir={out}"]  # one job is a one-value sweep: the same code path
        t = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t
        if proc.returncode != 0:
            raise SystemExit(f"sweep failed:\n{proc.stderr[-2000:]}")
        records = [json.loads(p.read_text()) for p in out.glob("*/run.json")]
    return {"wall": wall, "train": statistics.mean(r["train_seconds"] for r in records),
            "jobs": len(records)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jobs", type=int, default=8)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--data-root", type=Path, default=Path("data"))
    args = p.parse_args()
    basic, joblib, stacked = [], [], []
    one = []
    for r in range(args.rounds):
        one.append(sweep(1, args.steps, args.data_root, []))
        basic.append(sweep(args.jobs, args.steps, args.data_root, []))
        joblib.append(sweep(args.jobs, args.steps, args.data_root,
                            ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]))
        stacked.append(sweep(args.jobs, args.steps, args.data_root,
                             ["hydra/launcher=stacked"]))
        print(f"round {r + 1}: 1 job {one[-1]['wall']:.1f} s, basic {basic[-1]['wall']:.1f} s, "
              f"joblib {joblib[-1]['wall']:.1f} s, stacked {stacked[-1]['wall']:.1f} s",
              flush=True)
    t1 = min(x["wall"] for x in one)
    tb = min(x["wall"] for x in basic)
    tj = min(x["wall"] for x in joblib)
    ts = min(x["wall"] for x in stacked)
    train = statistics.mean(x["train"] for x in basic)
    overhead = (tb - t1) / (args.jobs - 1) - train
    print(f"\n{args.jobs} jobs x {args.steps} steps (best of {args.rounds})")
    print(f"basic launcher   {tb:7.1f} s   (1-job sweep {t1:.1f} s, mean training {train:.2f} s)")
    print(f"joblib, 2 jobs   {tj:7.1f} s")
    member = statistics.mean(x["train"] for x in stacked)
    print(f"stacked          {ts:7.1f} s   (training {member:.2f} s: the stack's, all members)")
    speedup = tb / tj
    print(f"joblib speed-up            {speedup:5.2f}x  {'PASS' if speedup >= 1.5 else 'FAIL'}"
          f" (target >= 1.5)")
    print(f"stacked speed-up           {tb / ts:5.2f}x  (no CPU target: a GPU's >= 8x is "
          f"scripts/bench_gpu.py's)")
    print(f"basic per-job overhead     {overhead:5.2f} s  {'PASS' if overhead <= 0.5 else 'FAIL'}"
          f" (target <= 0.5 s beyond training)")


if __name__ == "__main__":
    main()
