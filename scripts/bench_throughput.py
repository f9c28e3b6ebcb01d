"""Training throughput, side by side: the seed's loop, a plain tensor loop, and the harness.

SmallNet, batch 32, SGD(lr=0.001, momentum=0.9), one epoch of synthetic CIFAR-shaped data written
in the CIFAR-10 format (the package's synthetic path), so every variant reads the same files:

  a  the seed notebook: torchvision CIFAR10 + ToTensor/Normalize + DataLoader(num_workers=2),
     loss.item() every step
  b  plain PyTorch over resident uint8 batches (randperm + slicing), losses kept as tensors
  c  the harness: autograd_lab.train.run on a config composed through Hydra (chunks of 16 steps
     per Lightning batch, the default); c1 the same with one step per batch

Each measurement is a fresh subprocess (so peak RSS is per variant); variants are interleaved
over --rounds. Then --pairs rounds of b, c and p run in one process, order rotated, and the
medians of their c/b and p/c ratios are the figures that resist this shared machine's swings.
Only the epoch loop is timed. A measurement, not a test: exits 0 either way.

    python scripts/bench_throughput.py [--quick] [--rounds N] [--threads N] [--out FILE]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MARK = "BENCH_RESULT "
BATCH, LR, MOMENTUM = 32, 0.001, 0.9


def _rss_mib(who=resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 1024  # KiB on Linux


def _cpu_clock() -> tuple[float, float, float]:
    """(wall s, machine busy CPU s, this process's CPU s incl. reaped workers)."""
    with open("/proc/stat") as f:
        t = [int(v) for v in f.readline().split()[1:9]]
    own = sum(getattr(resource.getrusage(w), k) for k in ("ru_utime", "ru_stime")
              for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    return time.perf_counter(), (sum(t) - t[3] - t[4]) / os.sysconf("SC_CLK_TCK"), own


def compose_cfg(a: dict, extra: tuple[str, ...] = ()):
    """The harness config every variant shares (data location, sizes, optimiser)."""
    from autograd_lab.config import compose

    overrides = ["model=smallnet", "optim=sgd", f"optim.lr={LR}", f"optim.momentum={MOMENTUM}",
                 "data=synthetic", f"data.root={a['data_root']}", f"data.batch_size={BATCH}",
                 f"data.train_size={a['train_size']}", "trainer.max_epochs=1",
                 "trainer.limit_val_batches=0", "trainer.accelerator=cpu",
                 "trainer.progress_bar=false", f"threads={a['threads']}", *extra]
    return compose(overrides)


def _model_and_opt():
    import torch

    from autograd_lab.models import SmallNet

    torch.manual_seed(0)
    net = SmallNet()
    return net, torch.optim.SGD(net.parameters(), lr=LR, momentum=MOMENTUM)


# ------------------------------------------------------------------ variants (run in a child)
def prepare(a: dict) -> dict:
    """Write the synthetic files and the uint8 cache once, outside any measured process."""
    import torch

    from autograd_lab.data import load_split_tensors

    n = len(load_split_tensors(compose_cfg(a).data)["train_x"])
    return {"train_images": n, "default_threads": torch.get_num_threads()}


def seed_loop(a: dict) -> dict:
    import torch
    import torch.nn as nn
    import torchvision.transforms as transforms

    from autograd_lab.data import _synthetic_key, write_synthetic

    cfg = compose_cfg(a).data
    folder, dataset_cls = write_synthetic(
        Path(cfg.root) / "synthetic" / _synthetic_key(cfg), cfg)  # the harness's own files
    transform = transforms.Compose(
        [transforms.ToTensor(), transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])
    trainset = dataset_cls(str(folder), train=True, download=False, transform=transform)
    trainloader = torch.utils.data.DataLoader(trainset, batch_size=BATCH, shuffle=True,
                                              num_workers=2)
    net, optimizer = _model_and_opt()
    criterion = nn.CrossEntropyLoss()
    loss_history = []
    t0 = time.perf_counter()
    for inputs, labels in trainloader:
        optimizer.zero_grad()
        loss = criterion(net(inputs), labels)
        loss.backward()
        optimizer.step()
        loss_history.append(loss.item())
    seconds = time.perf_counter() - t0
    main = _rss_mib()
    return {"seconds": seconds, "images_per_s": len(trainset) / seconds,
            "steps": len(loss_history), "loss_last100": statistics.fmean(loss_history[-100:]),
            "peak_rss_mib": main, "peak_rss_workers_mib": main + _rss_mib(resource.RUSAGE_CHILDREN)}


def plain_loop(a: dict) -> dict:
    import torch
    import torch.nn.functional as F

    from autograd_lab.data import load_split_tensors, normalize

    t = load_split_tensors(compose_cfg(a).data)
    x, y = t["train_x"], t["train_y"]
    net, optimizer = _model_and_opt()
    losses = []
    t0 = time.perf_counter()
    order = torch.randperm(len(x))
    for i in range(0, len(x), BATCH):
        idx = order[i:i + BATCH]
        optimizer.zero_grad()
        loss = F.cross_entropy(net(normalize(x[idx])), y[idx])
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    history = torch.stack(losses).tolist()
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "images_per_s": len(x) / seconds, "steps": len(history),
            "loss_last100": statistics.fmean(history[-100:]), "peak_rss_mib": _rss_mib()}


def harness(a: dict, overrides: tuple[str, ...] = ()) -> dict:
    import pandas as pd

    from autograd_lab.train import run

    cfg = compose_cfg(a, overrides)
    run_dir = Path(tempfile.mkdtemp(prefix="bench_harness_"))
    try:
        rec = run(cfg, run_dir)
        losses = pd.read_parquet(run_dir / "metrics.parquet").query("name == 'train/loss'").value
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    return {"seconds": rec["train_seconds"], "images_per_s": rec["images_per_s"],
            "steps": len(losses), "loss_last100": float(losses.iloc[-100:].mean()),
            "status": rec["status"], "peak_rss_mib": rec["peak_rss_mib"]}


def paired(a: dict) -> dict:
    """b, c and p in one process, round after round, the order rotated each round (b c p,
    c p b, ...): the variants of a round run under the same machine load, so their ratios hold
    even when the absolute speed of this shared machine swings by 20% between rounds."""
    names = ["b", "c", "p"]
    rounds = []
    for k in range(a.get("pairs", 4)):
        speeds = {}
        for name in names[k % 3:] + names[:k % 3]:
            speeds[name] = VARIANTS[name][0](a)["images_per_s"]
        rounds.append(speeds)
    ratios = {"c/b": [r["c"] / r["b"] for r in rounds], "p/c": [r["p"] / r["c"] for r in rounds]}
    return {"pairs": rounds, "ratios": ratios,
            "median_ratio": {k: statistics.median(v) for k, v in ratios.items()},
            "images_per_s": statistics.median(r["c"] for r in rounds), "seconds": 0.0,
            "loss_last100": float("nan"), "peak_rss_mib": _rss_mib()}


# name -> (function run in the child, label). Add e.g. a harness with extra overrides as
#   "c_aug": (functools.partial(harness, overrides=("data.augment=flip_crop",)), "...")
VARIANTS = {
    "a": (seed_loop, "seed: torchvision + DataLoader(workers=2)"),
    "b": (plain_loop, "plain torch, resident tensors"),
    "c": (functools.partial(harness, overrides=("probes=off",)), "harness, probes=off"),
    "c1": (functools.partial(harness, overrides=("probes=off", "trainer.steps_per_execution=1")),
           "harness, probes=off, 1 step per batch"),
    "p": (functools.partial(harness, overrides=("probes=cheap",)), "harness, probes=cheap"),
    "f": (functools.partial(harness, overrides=("probes=full",)), "harness, probes=full"),
}
# c/b and c/a: the core harness; p/c: cheap probes at their default interval cost <= 5%.
TARGETS = [("c/b", 0.85), ("c/a", 3.5), ("p/c", 0.95), ("f/c", None), ("c1/b", None)]


def child(name: str, a: dict) -> None:
    import torch

    if a.get("threads"):
        torch.set_num_threads(a["threads"])
    fn = {"prepare": prepare, "paired": paired}.get(name) or VARIANTS[name][0]
    before = _cpu_clock()
    out = fn(a)
    wall, busy, own = (x - y for x, y in zip(_cpu_clock(), before, strict=True))
    # share of the machine's CPUs other processes used meanwhile: contention skews everything
    out["others_cpu"] = max(busy - own, 0.0) / (wall * os.cpu_count())
    out["threads"] = torch.get_num_threads()
    print(MARK + json.dumps(out), flush=True)


# ------------------------------------------------------------------ the parent
def spawn(name: str, a: dict) -> dict:
    cmd = [sys.executable, __file__, "--_child", name, "--json-args", json.dumps(a)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith(MARK)]
    if p.returncode or not lines:
        tail = "\n".join((p.stderr or p.stdout).strip().splitlines()[-15:])
        print(f"  {name}: FAILED (exit {p.returncode})\n{tail}", file=sys.stderr)
        return {"error": f"exit {p.returncode}"}
    return json.loads(lines[-1][len(MARK):])


def summarize(results: dict[str, list[dict]]) -> dict:
    summary = {}
    for name, runs in results.items():
        ok = [r for r in runs if "error" not in r]
        if not ok:
            continue
        ips = [r["images_per_s"] for r in ok]
        s = {"best": max(ips), "median": statistics.median(ips), "runs": len(ok),
             "peak_rss_mib": max(r["peak_rss_mib"] for r in ok),
             "loss_last100": statistics.median(r["loss_last100"] for r in ok)}
        if "peak_rss_workers_mib" in ok[0]:
            s["peak_rss_workers_mib"] = max(r["peak_rss_workers_mib"] for r in ok)
        summary[name] = s
    return summary


def checks(summary: dict) -> list[dict]:
    out = []
    for ratio, target in TARGETS:
        num, den = ratio.split("/")
        if num in summary and den in summary:
            # best/best and median/median: on a shared machine one outlier round can move
            # the best; the median shows whether the verdict is robust
            for stat in ("best", "median"):
                value = summary[num][stat] / summary[den][stat]
                label = f"{ratio} ({stat})" + ("" if target is None else f" >= {target}")
                out.append({"check": label, "value": value,
                            "pass": None if target is None else value >= target})
    if "a" in summary and "c" in summary:
        c, a = summary["c"]["peak_rss_mib"], summary["a"]["peak_rss_mib"]
        out.append({"check": "RSS(c) <= RSS(a main)", "value": c / a, "pass": c <= a})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--train-size", type=int, default=50000)
    p.add_argument("--data-root", default="./data")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma list, run in order")
    p.add_argument("--quick", action="store_true", help="smoke run: train_size 5000, 1 round")
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    p.add_argument("--pairs", type=int, default=4,
                   help="rounds of b, c, p epochs in one process after the others (0: skip)")
    p.add_argument("--_child", help=argparse.SUPPRESS)
    p.add_argument("--json-args", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._child:
        return child(args._child, json.loads(args.json_args))
    if args.quick:
        args.train_size, args.rounds = 5000, 1
    names = [v for v in args.variants.split(",") if v]
    if unknown := set(names) - set(VARIANTS):
        p.error(f"--variants: unknown {', '.join(sorted(unknown))}; known: {', '.join(VARIANTS)}")
    a = {"data_root": str(Path(args.data_root).resolve()), "train_size": args.train_size,
         "threads": args.threads}
    prep = spawn("prepare", a)
    if "error" in prep:
        sys.exit(0)
    a["threads"] = args.threads or prep["default_threads"]
    print(f"torch threads: {a['threads']} (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')})"
          f"  images/epoch: {prep['train_images']}  rounds: {args.rounds}  batch: {BATCH}")
    results: dict[str, list[dict]] = {n: [] for n in names}
    for r in range(args.rounds):
        for n in names:
            res = spawn(n, a)
            results[n].append(res)
            if "error" not in res:
                print(f"  round {r + 1} {n}: {res['images_per_s']:8.0f} img/s  "
                      f"{res['seconds']:6.1f} s  rss {res['peak_rss_mib']:6.0f} MiB  "
                      f"loss(last100) {res['loss_last100']:.3f}  others {res['others_cpu']:4.0%}",
                      flush=True)
    paired_result = None
    if args.pairs:
        paired_result = spawn("paired", {**a, "pairs": args.pairs})
        if "error" not in paired_result:
            for k, r in enumerate(paired_result["pairs"]):
                print(f"  one process, round {k + 1}: b {r['b']:.0f}  c {r['c']:.0f}  "
                      f"p {r['p']:.0f}  c/b {r['c'] / r['b']:.2f}  p/c {r['p'] / r['c']:.2f}",
                      flush=True)
    summary = summarize(results)
    print(f"\n{'variant':48} {'best img/s':>10} {'median':>8} {'peak RSS MiB':>13}")
    for n, s in summary.items():
        rss = f"{s['peak_rss_mib']:.0f}"
        if "peak_rss_workers_mib" in s:
            rss += f" (with workers {s['peak_rss_workers_mib']:.0f})"
        print(f"{n + ' ' + VARIANTS[n][1]:48} {s['best']:10.0f} {s['median']:8.0f} {rss:>13}")
    busy = max((r.get("others_cpu", 0) for rs in results.values() for r in rs), default=0)
    if busy > 0.1:
        print(f"\nWARNING: other processes used up to {busy:.0%} of the CPUs during a "
              f"measurement; with {a['threads']} torch threads the numbers are unreliable")
    print()
    found = checks(summary)
    if paired_result and "error" not in paired_result:
        for ratio, target in (("c/b", 0.85), ("p/c", 0.95)):
            value = paired_result["median_ratio"][ratio]
            found.append({"check": f"{ratio} (one process, median) >= {target}",
                          "value": value, "pass": value >= target})
    for c in found:
        verdict = '' if c['pass'] is None else ('PASS' if c['pass'] else 'FAIL')
        print(f"{c['check']:30} {c['value']:6.2f}  {verdict}")
    if args.out:
        Path(args.out).write_text(json.dumps(
            {"settings": a, "rounds": args.rounds, "results": results, "summary": summary,
             "paired": paired_result, "checks": found}, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
