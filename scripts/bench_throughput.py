"""Training throughput, side by side: the seed's loop, plain torch, plain Lightning, the harness.

SmallNet, batch 32, SGD(lr=0.001, momentum=0.9), one epoch of synthetic CIFAR-shaped data written
in the CIFAR-10 format (the package's synthetic path), so every variant reads the same files:

  a  the seed notebook: torchvision CIFAR10 + ToTensor/Normalize + DataLoader(num_workers=2),
     loss.item() every step
  b  plain PyTorch over resident uint8 batches (randperm + slicing), losses kept as tensors
  l  plain Lightning, the peer a user would write: a LightningModule with automatic optimization
     and self.log("train/loss") every step to a TensorBoardLogger, fed by a DataLoader over a
     TensorDataset of the resident normalised images
  c  the harness: autograd_lab.train.run on a config composed through Hydra (one Lightning batch
     is one optimizer step); p and f the same with cheap and full probes

Each measurement is a fresh subprocess (so peak RSS is per variant); variants are interleaved
over --rounds. Then --pairs rounds of b, c, p and l run in one process, order rotated,
and the medians of their ratios are the figures that resist this shared machine's swings.
`--model resnet18` (cifar stem, batch 128) runs only b and c, and only in the paired rounds.
Only the epoch loop is timed. A measurement, not a test: exits 0 either way.

    python scripts/bench_throughput.py [--quick] [--model smallnet|resnet18] [--rounds N]
                                       [--pairs N] [--threads N] [--out FILE]
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
LR, MOMENTUM = 0.001, 0.9
# per model: its overrides, batch, images per epoch (full, --quick), the variants of the
# fresh-process rounds (default) and of the paired rounds
MODELS = {
    "smallnet": {"overrides": ("model=smallnet",), "batch": 32, "train_size": 50000,
                 "quick_size": 5000, "variants": ("a", "b", "l", "c", "p", "f"),
                 "paired": ("b", "c", "p", "l")},
    # about 1.5 to 3 s a step of 128 on this 2-core machine: 20 steps an epoch, 2 with --quick
    "resnet18": {"overrides": ("model=resnet18", "model.stem=cifar"), "batch": 128,
                 "train_size": 2560, "quick_size": 256, "variants": (), "paired": ("b", "c")},
}


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
    """The harness config every variant shares (model, data location, sizes, optimiser)."""
    from autograd_lab.config.compose import compose

    overrides = [*MODELS[a["model"]]["overrides"], "optim=sgd", f"optim.lr={LR}",
                 f"optim.momentum={MOMENTUM}", "data=synthetic", f"data.root={a['data_root']}",
                 f"data.batch_size={a['batch']}", f"data.train_size={a['train_size']}",
                 "trainer.max_epochs=1", "trainer.limit_val_batches=0",
                 "trainer.accelerator=cpu", "trainer.progress_bar=false",
                 f"threads={a['threads']}", *extra]
    return compose(overrides)


def _model(a: dict):
    """The harness's model with the harness's initial weights (it seeds with cfg.seed, then
    builds through autograd_lab.model.networks.build_model on the same composed config)."""
    import torch

    from autograd_lab.model.networks import build_model

    cfg = compose_cfg(a)
    torch.manual_seed(cfg.seed)
    return build_model(cfg.model)


def _model_and_opt(a: dict):
    import torch

    net = _model(a)
    return net, torch.optim.SGD(net.parameters(), lr=LR, momentum=MOMENTUM)


# ------------------------------------------------------------------ variants (run in a child)
def prepare(a: dict) -> dict:
    """Write the synthetic files and the uint8 cache once, outside any measured process."""
    import torch

    from autograd_lab.data.loader import load_split_tensors

    n = len(load_split_tensors(compose_cfg(a).data)["train_x"])
    return {"train_images": n, "default_threads": torch.get_num_threads()}


def seed_loop(a: dict) -> dict:
    import torch
    import torch.nn as nn
    import torchvision.transforms as transforms

    from autograd_lab.config.resources import synthetic_key
    from autograd_lab.data.synthetic import write_synthetic

    cfg = compose_cfg(a).data
    folder, dataset_cls = write_synthetic(
        Path(cfg.root) / "synthetic" / synthetic_key(cfg), cfg)  # the harness's own files
    transform = transforms.Compose(
        [transforms.ToTensor(), transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])
    trainset = dataset_cls(str(folder), train=True, download=False, transform=transform)
    trainloader = torch.utils.data.DataLoader(trainset, batch_size=a["batch"], shuffle=True,
                                              num_workers=2)
    net, optimizer = _model_and_opt(a)
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

    from autograd_lab.data.loader import load_split_tensors, normalize

    t = load_split_tensors(compose_cfg(a).data)
    x, y = t["train_x"], t["train_y"]
    net, optimizer = _model_and_opt(a)
    batch, losses = a["batch"], []
    t0 = time.perf_counter()
    order = torch.randperm(len(x))
    for i in range(0, len(x), batch):
        idx = order[i:i + batch]
        optimizer.zero_grad()
        loss = F.cross_entropy(net(normalize(x[idx])), y[idx])
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    history = torch.stack(losses).tolist()
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "images_per_s": len(x) / seconds, "steps": len(history),
            "loss_last100": statistics.fmean(history[-100:]), "peak_rss_mib": _rss_mib()}


def lightning_loop(a: dict) -> dict:
    """What a Lightning user would write for the seed's training, timed like the harness: from
    the epoch's start to its end (a callback; the harness's RunRecorder does the same)."""
    import lightning as L
    import torch
    import torch.nn.functional as F
    from lightning.pytorch.loggers import TensorBoardLogger
    from torch.utils.data import DataLoader, TensorDataset

    from autograd_lab.data.loader import load_split_tensors, normalize

    class LitClassifier(L.LightningModule):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = F.cross_entropy(self.model(x), y)
            self.log("train/loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=LR, momentum=MOMENTUM)

    class EpochClock(L.Callback):
        def __init__(self):
            self.seconds, self.images, self.losses = 0.0, 0, []

        def on_train_epoch_start(self, trainer, pl_module):
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.images += len(batch[1])
            self.losses.append(outputs["loss"].detach())

        def on_train_epoch_end(self, trainer, pl_module):
            self.seconds += time.perf_counter() - self.t0

    t = load_split_tensors(compose_cfg(a).data)
    loader = DataLoader(TensorDataset(normalize(t["train_x"]), t["train_y"]),
                        batch_size=a["batch"], shuffle=True, num_workers=0)
    module = LitClassifier(_model(a))
    clock = EpochClock()
    log_dir = tempfile.mkdtemp(prefix="bench_lightning_")
    try:
        trainer = L.Trainer(max_epochs=1, log_every_n_steps=1, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False,
                            num_sanity_val_steps=0, limit_val_batches=0, accelerator="cpu",
                            devices=1, logger=TensorBoardLogger(log_dir), callbacks=[clock])
        trainer.fit(module, train_dataloaders=loader)
    finally:
        shutil.rmtree(log_dir, ignore_errors=True)
    history = torch.stack(clock.losses).tolist()
    return {"seconds": clock.seconds, "images_per_s": clock.images / clock.seconds,
            "steps": len(history), "loss_last100": statistics.fmean(history[-100:]),
            "peak_rss_mib": _rss_mib()}


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
            "status": rec["status"], "peak_rss_mib": rec["process_peak_rss_mib"]}


def _warm_up(a: dict) -> None:
    """One untimed step of the model, so the first paired round does not alone pay the
    process's one-off costs (allocator growth, kernel setup)."""
    import torch
    import torch.nn.functional as F

    net, optimizer = _model_and_opt(a)
    x, y = torch.zeros(a["batch"], 3, 32, 32), torch.zeros(a["batch"], dtype=torch.long)
    F.cross_entropy(net(x), y).backward()
    optimizer.step()


def paired(a: dict) -> dict:
    """The model's paired variants in one process, round after round, the order rotated each
    round (b c p l, c p l b, ...): the variants of a round run under the same machine
    load, so their ratios hold even when the absolute speed of this shared machine swings by 20%
    between rounds."""
    names = list(MODELS[a["model"]]["paired"])
    _warm_up(a)
    rounds = []
    for k in range(a.get("pairs", 4)):
        speeds = {}
        shift = k % len(names)
        for name in names[shift:] + names[:shift]:
            speeds[name] = ALL[name][0](a)["images_per_s"]
        rounds.append(speeds)
    ratios = {r: [s[r.split("/")[0]] / s[r.split("/")[1]] for s in rounds]
              for r, _ in TARGETS[a["model"]] if set(r.split("/")) <= set(names)}
    return {"pairs": rounds, "ratios": ratios,
            "median_ratio": {k: statistics.median(v) for k, v in ratios.items()},
            "images_per_s": statistics.median(r["c"] for r in rounds), "seconds": 0.0,
            "loss_last100": float("nan"), "peak_rss_mib": _rss_mib()}


# name -> (function run in the child, label). Add e.g. a harness with extra overrides as
#   "c_aug": (functools.partial(harness, overrides=("data.augment=flip_crop",)), "...")
VARIANTS = {
    "a": (seed_loop, "seed: torchvision + DataLoader(workers=2)"),
    "b": (plain_loop, "plain torch, resident tensors"),
    "l": (lightning_loop, "plain Lightning, the peer a user would write"),
    "c": (functools.partial(harness, overrides=("probes=off",)), "harness, probes=off"),
    "p": (functools.partial(harness, overrides=("probes=cheap",)), "harness, probes=cheap"),
    "f": (functools.partial(harness, overrides=("probes=full",)), "harness, probes=full"),
}
PAIRED_ONLY: dict = {}
ALL = {**VARIANTS, **PAIRED_ONLY}
# c/b, c/l and c/a: the core harness against a plain loop, plain Lightning and the seed;
# p/c: cheap probes at their default interval cost <= 5%. None: reported, no target.
TARGETS = {
    "smallnet": [("c/b", 0.80), ("c/l", 1.25), ("c/a", 3.5), ("p/c", 0.95), ("f/c", None)],
    "resnet18": [("c/b", 0.97)],
}
AIMS = {("smallnet", "c/b"): 0.85}  # where the target is the floor, what we aim for


def child(name: str, a: dict) -> None:
    import torch

    if a.get("threads"):
        torch.set_num_threads(a["threads"])
    fn = {"prepare": prepare, "paired": paired}.get(name) or ALL[name][0]
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


def _label(model: str, ratio: str, how: str, target: float | None) -> str:
    label = f"{ratio} ({how})"
    if target is not None:
        label += f" >= {target}"
        if (model, ratio) in AIMS:
            label += f" (aim {AIMS[model, ratio]})"
    return label


def checks(model: str, summary: dict, paired_result: dict | None) -> list[dict]:
    out = []
    for ratio, target in TARGETS[model]:
        num, den = ratio.split("/")
        if num in summary and den in summary:
            # best/best and median/median: on a shared machine one outlier round can move
            # the best; the median shows whether the verdict is robust
            for stat in ("best", "median"):
                value = summary[num][stat] / summary[den][stat]
                out.append({"check": _label(model, ratio, stat, target), "value": value,
                            "pass": None if target is None else value >= target})
        if paired_result and ratio in paired_result.get("median_ratio", {}):
            value = paired_result["median_ratio"][ratio]
            out.append({"check": _label(model, ratio, "one process, median", target),
                        "value": value, "pass": None if target is None else value >= target})
    if "a" in summary and "c" in summary:
        c, a = summary["c"]["peak_rss_mib"], summary["a"]["peak_rss_mib"]
        out.append({"check": "RSS(c) <= RSS(a main)", "value": c / a, "pass": c <= a})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=list(MODELS), default="smallnet",
                   help="resnet18: cifar stem, batch 128, only b and c in the paired rounds")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--train-size", type=int, default=None,
                   help="images per epoch (default: smallnet 50000, resnet18 2560)")
    p.add_argument("--data-root", default="./data")
    p.add_argument("--variants", default=None,
                   help="comma list of fresh-process variants, run in order (default: smallnet "
                        f"{','.join(MODELS['smallnet']['variants'])}; resnet18 none)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 1 round, train_size 5000 (resnet18: 256)")
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    p.add_argument("--pairs", type=int, default=4,
                   help="rounds of the paired variants in one process after the others (0: skip)")
    p.add_argument("--_child", help=argparse.SUPPRESS)
    p.add_argument("--json-args", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._child:
        return child(args._child, json.loads(args.json_args))
    model = MODELS[args.model]
    train_size = args.train_size or model["train_size"]
    if args.quick:
        train_size, args.rounds = args.train_size or model["quick_size"], 1
    variants = model["variants"] if args.variants is None else args.variants.split(",")
    names = [v for v in variants if v]
    if unknown := set(names) - set(VARIANTS):
        p.error(f"--variants: unknown {', '.join(sorted(unknown))}; known: {', '.join(VARIANTS)}")
    if args.model == "resnet18" and set(names) - {"b", "c"}:
        p.error("--variants: --model resnet18 runs only b and c")
    a = {"model": args.model, "batch": model["batch"], "data_root": str(Path(args.data_root)
         .resolve()), "train_size": train_size, "threads": args.threads}
    prep = spawn("prepare", a)
    if "error" in prep:
        sys.exit(0)
    a["threads"] = args.threads or prep["default_threads"]
    print(f"model: {args.model}  torch threads: {a['threads']} "
          f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')})  images/epoch: "
          f"{prep['train_images']}  rounds: {args.rounds if names else 0}  batch: {a['batch']}")
    results: dict[str, list[dict]] = {n: [] for n in names}
    for r in range(args.rounds if names else 0):
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
                speeds = "  ".join(f"{n} {v:.0f}" for n, v in r.items())
                ratios = "  ".join(f"{ratio} {v[k]:.2f}"
                                   for ratio, v in paired_result["ratios"].items())
                print(f"  one process, round {k + 1}: {speeds}  {ratios}", flush=True)
            print(f"  one process: other processes used {paired_result['others_cpu']:.0%} of "
                  f"the CPUs meanwhile", flush=True)
        else:
            paired_result = None
    summary = summarize(results)
    if summary:
        print(f"\n{'variant':52} {'best img/s':>10} {'median':>8} {'peak RSS MiB':>13}")
    for n, s in summary.items():
        rss = f"{s['peak_rss_mib']:.0f}"
        if "peak_rss_workers_mib" in s:
            rss += f" (with workers {s['peak_rss_workers_mib']:.0f})"
        print(f"{n + ' ' + VARIANTS[n][1]:52} {s['best']:10.0f} {s['median']:8.0f} {rss:>13}")
    busy = max((r.get("others_cpu", 0) for rs in results.values() for r in rs), default=0)
    busy = max(busy, paired_result["others_cpu"] if paired_result else 0)
    if busy > 0.1:
        print(f"\nWARNING: other processes used up to {busy:.0%} of the CPUs during a "
              f"measurement; with {a['threads']} torch threads the numbers are unreliable")
    print()
    found = checks(args.model, summary, paired_result)
    for c in found:
        verdict = '' if c['pass'] is None else ('PASS' if c['pass'] else 'MISS')
        print(f"{c['check']:48} {c['value']:6.2f}  {verdict}")
    if args.out:
        Path(args.out).write_text(json.dumps(
            {"settings": a, "rounds": args.rounds, "results": results, "summary": summary,
             "paired": paired_result, "checks": found}, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
