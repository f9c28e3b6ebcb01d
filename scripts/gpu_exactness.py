"""Sections 7 and 8 of scripts/gpu_check.py (exactness on a GPU of what issue 26 added): the
training step as a CUDA graph against the eager step, and stacked seeds against separate runs.
Imported by gpu_check.py (`--only graph,stacked`); needs a CUDA GPU."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def cfg_of(*overrides, data_root):
    from autograd_lab.config.compose import compose

    return compose(["data=synthetic", f"data.root={data_root}", "trainer.progress_bar=false",
                    "probes=off", "log.flush_every_s=1000", *overrides])


def _curve(run_dir):
    import pandas as pd

    f = pd.read_parquet(run_dir / "metrics.parquet")
    return f[f.name == "train/loss"].sort_values("step").value.to_numpy()


def _compared(a, b) -> tuple[bool, float]:
    """(bitwise equal, max |a - b|) of two curves; unequal lengths are never equal."""
    if len(a) != len(b):
        return False, float("inf")
    return bool((a == b).all()), float(abs(a - b).max()) if len(a) else 0.0


def graph_exactness(root, work: Path) -> dict:
    """7. trainer.cuda_graph=true against the eager step, bit for bit, and a kill/resume."""
    import lightning as L

    from autograd_lab.train import run

    class Seen(L.Callback):
        replays = captures = 0

        def on_train_end(self, trainer, pl_module):
            g = pl_module.graphed
            self.replays, self.captures = (g.replays, g.captures) if g is not None else (0, 0)

    # 33 batches an epoch, the last one of 16 (run eagerly between replays); validation eager
    base = ("data.train_size=1040", "data.test_size=256", "trainer.max_epochs=2",
            "trainer.deterministic=true", "log.flush_every_s=1000")
    cases = [  # (name, overrides of both runs, of the eager run only)
        ("default", (), ()),
        ("train.zero_grad=false", ("train.zero_grad=false",), ()),
        ("variant=frozen_early", ("variant=frozen_early",), ()),
        ("variant=detach_shallow", ("variant=detach_shallow",), ()),
        ("scheduler=step optim.lr=0.05", ("scheduler=step", "optim.lr=0.05"), ()),
        ("optim=adam (eager: optim.capturable=true)", ("optim=adam",),
         ("optim.capturable=true",)),
        ("trainer.precision=bf16-mixed", ("trainer.precision=bf16-mixed",), ()),
        ("probes=full", ("probes=full",), ()),
    ]
    results: dict = {}
    for i, (name, over, eager_only) in enumerate(cases):
        seen = Seen()
        run(cfg_of(*base, *over, *eager_only, data_root=root), work / f"graph{i}_eager")
        run(cfg_of(*base, *over, "trainer.cuda_graph=true", data_root=root),
            work / f"graph{i}_graph", callbacks=[seen])
        a, b = _curve(work / f"graph{i}_eager"), _curve(work / f"graph{i}_graph")
        equal, diff = _compared(a, b)
        ok = equal and seen.replays > 0
        results[name] = {"steps": len(b), "replays": seen.replays, "captures": seen.captures,
                         "bitwise_equal": equal, "max_abs_diff": diff, "pass": ok}
        print(f"7. graph exactness, {name}: {len(b)} steps, {seen.replays} replays, "
              f"{seen.captures} captures, max |diff| = {diff:.3g}: {'PASS' if ok else 'FAIL'}",
              flush=True)

    class Term(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 20:  # after replays (the graph is captured at step 3)
                os.kill(os.getpid(), signal.SIGTERM)

    over = (*base, "train.zero_grad=false", "trainer.cuda_graph=true")
    try:
        run(cfg_of(*over, data_root=root), work / "graph_cut", callbacks=[Term()])
        code = None
    except SystemExit as e:
        code = e.code
    seen = Seen()
    res = run(cfg_of(*over, data_root=root), work / "graph_cut", callbacks=[seen])
    a, b = _curve(work / "graph1_eager"), _curve(work / "graph_cut")  # the eager zero_grad=false
    equal, diff = _compared(a, b)
    ok = equal and code == 128 + signal.SIGTERM and res["resumed"]["from_step"] == 20 \
        and seen.replays > 0
    results["kill/resume"] = {"exit": code, "status": res["status"],
                              "from_step": res["resumed"]["from_step"],
                              "replays_after_resume": seen.replays, "bitwise_equal": equal,
                              "max_abs_diff": diff, "pass": ok}
    print(f"7. graph kill/resume: exit {code}, resumed from step "
          f"{res['resumed']['from_step']}, {seen.replays} replays after it, vs the eager run: "
          f"max |diff| = {diff:.3g}: {'PASS' if ok else 'FAIL'}", flush=True)
    return results


def stacked_exactness(root, work: Path) -> dict:
    """8: the stacked launcher's members against the same jobs run one by one, on the GPU."""
    import subprocess

    import numpy as np
    import pandas as pd

    exe = Path(sys.executable).parent / "autograd-lab"
    common = ["data=synthetic", f"data.root={root}", "data.train_size=2048",
              "data.test_size=512", "trainer.max_epochs=2", "probes=off",
              "trainer.progress_bar=false", "seed=0,1,2,3", "train.zero_grad=true,false"]
    walls = {}
    for name, extra in (("stacked", ["hydra/launcher=stacked"]), ("basic", [])):
        t = time.perf_counter()
        proc = subprocess.run([str(exe), "train", "-m", *extra, *common,
                               f"hydra.sweep.dir={work / ('sweep_' + name)}"],
                              capture_output=True, text=True)
        walls[name] = round(time.perf_counter() - t, 1)
        if proc.returncode != 0:
            print(f"8. stacked: {name} sweep failed:\n{proc.stderr[-2000:]}", flush=True)
            return {"error": proc.stderr[-2000:]}
    worst = {"true": 0.0, "false": 0.0}
    for run_dir in sorted((work / "sweep_stacked").glob("seed=*")):
        a = pd.read_parquet(run_dir / "metrics.parquet")
        b = pd.read_parquet(work / "sweep_basic" / run_dir.name / "metrics.parquet")
        a, b = (f[~f.name.str.startswith("time/")].sort_values(["step", "name"])
                for f in (a, b))
        x, y = a.value.to_numpy(), b.value.to_numpy()
        key = "false" if "zero_grad=false" in run_dir.name else "true"
        worst[key] = max(worst[key],
                         float(np.max(np.abs(x - y) / np.maximum(np.abs(y), 1e-12))))
    # with zero_grad the runs are stable: members equal separate runs to float32 rounding.
    # Without it the accumulated gradient makes the run chaotic, and any rounding difference
    # grows (as between two separate runs with another thread count): reported, not judged
    ok = worst["true"] <= 1e-5
    result = {"members": 8, "max_rel_diff_zero_grad": worst["true"],
              "max_rel_diff_no_zero_grad": worst["false"], "pass": ok, "wall_s": walls}
    print(f"8. stacked members vs separate runs on GPU: zero_grad on: max rel diff "
          f"{worst['true']:.3g} ({'PASS' if ok else 'FAIL'} at 1e-5); zero_grad off (chaotic, "
          f"rounding grows): {worst['false']:.3g}; wall {walls}", flush=True)
    return result
