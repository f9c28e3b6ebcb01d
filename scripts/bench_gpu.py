"""GPU speed of the harness against a plain loop, side by side in one process (issue 26).

One command on a machine with a CUDA GPU:

    python scripts/bench_gpu.py [--only smallnet,resnet18,stacked,study] [--out FILE]
    python scripts/bench_gpu.py --cpu-smoke      # every path, tiny, on the CPU: checks the script

Rows (img/s over warm epochs only: the first epoch, with warm-up, cuDNN autotuning, compiling
and CUDA-graph capture, is left out; the GPU is synchronised at both ends of a timed epoch):
  SmallNet, batch 32:  b          a plain eager loop written out below (resident tensors on the
                                  GPU, the harness's model, optimizer and normalisation)
                       c          the harness (autograd_lab.api.run), float32 eager
                       c-graph    the harness with trainer.cuda_graph=true
  ResNet18, batch 128: b, c       float32 eager, as above
                       c-bf16-cl  trainer.precision=bf16-mixed model.channels_last=true
                       c-compiled model.compile=true
  Sweeps, timed end to end as subprocesses (start-up included):
    16 SmallNet seeds with hydra/launcher=stacked against the same 16 jobs with Hydra's basic
    launcher (one after another); the zero-grad study (8 seeds x train.zero_grad=true,false, 5
    epochs of 50,000 images at batch 32) with the stacked launcher, against 2 minutes.
A row whose key or launcher does not exist yet, or that the harness refuses, says so and the
others still run. Targets (issue 26): c-graph >= 2x b (SmallNet); c-bf16-cl >= 2x b (ResNet18);
stacked >= 8x sequential; the stacked study under 120 s.
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
TARGETS = {"smallnet": ("c-graph", 2.0), "resnet18": ("c-bf16-cl", 2.0)}
# per model: batch, images per epoch (a multiple of the batch: no short last batch, which would
# be another shape to compile or capture), epochs, the harness rows and their extra overrides
FULL = {"smallnet": {"batch": 32, "size": 49152, "epochs": 3, "warm": 50},
        "resnet18": {"batch": 128, "size": 19968, "epochs": 3, "warm": 20}}
SMOKE = {"smallnet": {"batch": 32, "size": 128, "epochs": 2, "warm": 2},
         "resnet18": {"batch": 8, "size": 16, "epochs": 2, "warm": 1}}
ROWS = {"smallnet": {"c": [], "c-graph": ["trainer.cuda_graph=true"]},
        "resnet18": {"c": [], "c-bf16-cl": ["trainer.precision=bf16-mixed",
                                            "model.channels_last=true"],
                     "c-compiled": ["model.compile=true"]}}


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def overrides(model: str, s: dict, a) -> list[str]:
    """What b and every c row share: model, data, batch, epochs, no validation, no probes."""
    return [f"model={model}", "data=synthetic", f"data.root={a.data_root}",
            f"data.train_size={s['size']}", "data.test_size=1000", f"data.batch_size={s['batch']}",
            f"trainer.max_epochs={s['epochs']}", "trainer.limit_val_batches=0", "probes=off",
            "log.flush_every_s=1000", f"trainer.accelerator={a.accelerator}", "resume=false"]


def plain_loop(model: str, s: dict, a, device) -> float:
    """b: the seed's step over resident batches on the device, no framework; best warm epoch."""
    import torch
    import torch.nn.functional as F

    from autograd_lab.config.compose import compose
    from autograd_lab.data.loader import load_split_tensors, normalize
    from autograd_lab.model.module import build_optimizer
    from autograd_lab.model.networks import build_model

    cfg = compose(overrides(model, s, a))
    torch.manual_seed(cfg.seed)
    net = build_model(cfg.model).to(device).train()
    opt = build_optimizer(net.parameters(), cfg.optim)
    t = load_split_tensors(cfg.data)
    x, y, b = t["train_x"].to(device), t["train_y"].to(device), s["batch"]

    def step(idx):
        opt.zero_grad()
        loss = F.cross_entropy(net(normalize(x[idx])), y[idx])
        loss.backward()
        opt.step()

    for i in range(s["warm"]):  # untimed: allocator, cuDNN's choice of kernels
        step(torch.arange(i * b, (i + 1) * b, device=device) % len(x))
    best = 0.0
    for _ in range(s["epochs"] - 1):  # as many timed epochs as the harness's warm ones
        order = torch.randperm(len(x), device=device)
        sync(device)
        t0 = time.perf_counter()
        for i in range(0, len(x), b):
            step(order[i:i + b])
        sync(device)
        best = max(best, len(x) / (time.perf_counter() - t0))
    return best


def epoch_clock(device):
    """A Lightning callback: the wall time of each training epoch, the device synchronised."""
    import lightning as L

    class EpochClock(L.Callback):
        def __init__(self):
            self.times: list[float] = []

        def on_train_epoch_start(self, trainer, pl_module):
            sync(device)
            self.t0 = time.perf_counter()

        def on_train_epoch_end(self, trainer, pl_module):
            sync(device)
            self.times.append(time.perf_counter() - self.t0)

    return EpochClock()


def harness(model: str, extra: list[str], s: dict, a, device, work: Path) -> float | str:
    """c: autograd_lab.api.run; img/s of the best warm epoch, or why the row did not run."""
    import autograd_lab.api as al
    from autograd_lab.errors import UserError

    clock = epoch_clock(device)
    run_dir = Path(tempfile.mkdtemp(prefix=f"{model}_", dir=work))
    try:
        r = al.run([*overrides(model, s, a), *extra], run_dir, callbacks=[clock])
    except UserError as e:
        return f"refused: {e}"
    except Exception as e:  # a benchmark reports and goes on with the other rows
        return f"failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    if r.status != "completed":
        return f"{r.status}: {r.record.get('error')}"
    return s["size"] / min(clock.times[1:])


def has_key(group_file: str, key: str | None = None) -> bool:
    """Whether conf/<group_file> exists (and, with `key`, names that key)."""
    path = REPO / "conf" / group_file
    if not path.is_file():
        return False
    if key is None:
        return True
    import yaml

    return key in (yaml.safe_load(path.read_text()) or {})


def sweep(args: list[str], a, work: Path, name: str) -> tuple[float | None, str]:
    """`autograd-lab train -m ARGS` in a subprocess, timed end to end: (seconds, problem)."""
    exe = Path(sys.executable).parent / "autograd-lab"
    cmd = [str(exe), "train", "-m", *args, f"data.root={a.data_root}",
           f"trainer.accelerator={a.accelerator}", f"hydra.sweep.dir={work / name}"]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS",
                                                                              "1")})
    seconds = time.perf_counter() - t0
    if p.returncode:
        lines = (p.stderr or p.stdout).strip().splitlines()
        said = [ln for ln in lines if ln.startswith("autograd-lab: error:")]
        return None, f"exit {p.returncode}: {(said or lines or [''])[-1].strip()}"
    return seconds, ""


def card() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 else "nvidia-smi failed"
    except (OSError, subprocess.TimeoutExpired, IndexError):
        return "no nvidia-smi"


def show(label: str, value, ref: float | None = None, unit="img/s", note: str = "") -> None:
    """One row: label, number (or why there is none), its multiple of b, what it runs."""
    if isinstance(value, str):
        print(f"  {label:12} {value}  {note}".rstrip())
    else:
        ratio = f"{value / ref:5.2f}x b" if ref else " " * 7
        print(f"  {label:12} {value:8.0f} {unit:5}  {ratio}  {note}".rstrip())


def verdict(value, target: float, more_is_better: bool = True) -> str:
    if not isinstance(value, float):
        return "not measured"
    ok = value >= target if more_is_better else value <= target
    return "PASS" if ok else "MISS"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu-smoke", action="store_true",
                   help="run every path tiny on the CPU (checks the script; numbers mean nothing)")
    p.add_argument("--only", default="smallnet,resnet18,stacked,study",
                   help="comma list of sections: smallnet, resnet18, stacked, study")
    p.add_argument("--stack-train-size", type=int, default=50000,
                   help="images per job of the 16-seed stacked vs sequential sweeps (1 epoch)")
    p.add_argument("--data-root", default=None, help="synthetic data (default: a temp folder)")
    p.add_argument("--out", default=None, help="also write the numbers as JSON here")
    a = p.parse_args()

    import torch

    if not a.cpu_smoke and not torch.cuda.is_available():
        print("bench_gpu.py: error: no CUDA device here; run it on a GPU machine, or with "
              "--cpu-smoke to check every path tiny on the CPU", file=sys.stderr)
        sys.exit(2)
    sections = set(a.only.split(","))
    work = Path(tempfile.mkdtemp(prefix="bench_gpu_"))
    a.data_root = str(Path(a.data_root or work / "data").resolve())
    a.accelerator = "cpu" if a.cpu_smoke else "gpu"
    device = torch.device("cpu" if a.cpu_smoke else "cuda")
    sizes = SMOKE if a.cpu_smoke else FULL
    print(f"{datetime.datetime.now():%Y-%m-%d %H:%M}  card: "
          f"{'none (--cpu-smoke)' if a.cpu_smoke else card()}  torch {torch.__version__} "
          f"(CUDA {torch.version.cuda})  load {os.getloadavg()[0]:.2f}", flush=True)
    if a.cpu_smoke:
        print("--cpu-smoke: tiny sizes on the CPU; the numbers mean nothing", flush=True)
    out: dict = {}

    for model in ("smallnet", "resnet18"):
        if model not in sections:
            continue
        s = sizes[model]
        print(f"\n{model}, batch {s['batch']}, {s['size']} images an epoch, "
              f"{s['epochs'] - 1} timed epoch(s)", flush=True)
        row = out[model] = {"b": plain_loop(model, s, a, device)}
        show("b", row["b"], note="plain eager loop, float32")
        for name, extra in ROWS[model].items():
            if name == "c-graph" and not has_key("trainer/default.yaml", "cuda_graph"):
                row[name] = "not available (no trainer.cuda_graph in conf/trainer/default.yaml)"
            else:
                row[name] = harness(model, extra, s, a, device, work)
            show(name, row[name], row["b"], note=" ".join(extra) or "harness, float32 eager")

    if "stacked" in sections:
        n = 16 if not a.cpu_smoke else 4
        seeds = "seed=" + ",".join(map(str, range(n)))
        size = a.stack_train_size if not a.cpu_smoke else 64
        common = [seeds, "data=synthetic", f"data.train_size={size}", "data.test_size=1000",
                  "trainer.max_epochs=1", "probes=off"]
        print(f"\n{n} SmallNet seeds, 1 epoch of {size} images each, end to end", flush=True)
        seq, why = sweep(common, a, work, "sequential")
        out["sequential_s"] = seq if seq is not None else why
        show("sequential", seq if seq is not None else why, unit="s", note="basic launcher")
        if has_key("hydra/launcher/stacked.yaml"):
            st, why = sweep(["hydra/launcher=stacked", *common], a, work, "stacked")
        else:
            st, why = None, "not available (no conf/hydra/launcher/stacked.yaml)"
        out["stacked_s"] = st if st is not None else why
        show("stacked", st if st is not None else why, unit="s", note="hydra/launcher=stacked")
        out["stacked_speedup"] = seq / st if seq and st else None

    if "study" in sections:
        seeds = "seed=" + ",".join(map(str, range(8 if not a.cpu_smoke else 2)))
        size = 50000 if not a.cpu_smoke else 64
        args = ["experiment=zero_grad_study", "hydra/launcher=stacked", seeds, "data=synthetic",
                f"data.train_size={size}"]
        print(f"\nzero-grad study, stacked: autograd-lab train -m {' '.join(args)}", flush=True)
        if has_key("hydra/launcher/stacked.yaml"):
            st, why = sweep(args, a, work, "study")
        else:
            st, why = None, "not available (no conf/hydra/launcher/stacked.yaml)"
        out["study_s"] = st if st is not None else why
        show("stacked", st if st is not None else why, unit="s", note="wall, start-up included")

    print("\ntargets (issue 26)")
    checks = []  # (what, value, shown, target shown, verdict)
    for model, (name, target) in TARGETS.items():
        if model in out:
            v, b = out[model].get(name), out[model]["b"]
            r = v / b if isinstance(v, float) else None
            checks.append((f"{model} {name} / b", r, f">= {target:g}x", verdict(r, target), "x"))
    if "stacked_speedup" in out:
        r = out["stacked_speedup"]
        checks.append(("16 seeds stacked / sequential", r, ">= 8x", verdict(r, 8.0), "x"))
    if "study_s" in out:
        v = out["study_s"] if isinstance(out["study_s"], float) else None
        checks.append(("zero-grad study, stacked", v, "<= 120 s",
                       verdict(v, 120.0, more_is_better=False), " s"))
    for what, value, target, word, unit in checks:
        digits = 2 if unit == "x" else 0
        shown = "-" if value is None else f"{value:.{digits}f}{unit}"
        print(f"  {what:32} {shown:>8}  {target:9} {word}")
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
