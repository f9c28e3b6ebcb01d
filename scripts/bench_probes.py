"""What the probes cost, measured side by side in one process.

1. overhead: whole harness runs (SmallNet, synthetic data, batch 32), `probes=off` and
   `probes=cheap` alternating, several repeats, at 1 and 2 torch threads: the ratio of training
   seconds, cheap/off, per pair (target: within 5%).
2. cost: each second-order probe per call (ms) at its defaults (conf/probes/full.yaml), against
   the time of one training step at batch 32, and its share of a run at its default interval:
   call / (interval x step).
3. spectrum: the spectrum probe's parts per call at full.yaml's defaults (the Hessian block's
   graph, Hutchinson's trace, the top-k Lanczos, the density by stochastic Lanczos quadrature,
   and the whole call), at 1 torch thread and at torch's default, in seconds and in training
   steps (batch 32), and the whole call's share of a run at its default interval.

    .venv/bin/python scripts/bench_probes.py                  # both parts, CPU
    .venv/bin/python scripts/bench_probes.py --part cost --device cuda --models resnet18
    .venv/bin/python scripts/bench_probes.py --part spectrum        # the spectrum probe, CPU

On a CPU, ResNet18's sharpness call at 1024 examples takes minutes: `--resnet-examples` measures
it (and the spectrum probe) on fewer examples and scales linearly to the default (said in the
output).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

FULL = yaml.safe_load((Path(__file__).resolve().parents[1] / "conf/probes/full.yaml").read_text())


def overhead(repeats: int, threads: list[int], steps: int) -> None:
    from autograd_lab.config.compose import compose
    from autograd_lab.train import run

    tmp = Path(tempfile.mkdtemp())
    common = ["data=synthetic", f"data.root={tmp / 'data'}", f"data.train_size={steps * 32}",
              "data.test_size=256", "trainer.max_epochs=1", "trainer.progress_bar=false",
              "logger=tensorboard", "checkpoint.every_n_steps=0"]
    counter = iter(range(10_000))
    for n in threads:
        torch.set_num_threads(n)
        run(compose([*common, "probes=off", f"threads={n}"]), tmp / f"w{next(counter)}")  # warm
        ratios, secs = [], {"off": [], "cheap": []}
        for _ in range(repeats):
            pair = {}
            for mode in ("off", "cheap"):
                rec = run(compose([*common, f"probes={mode}", f"threads={n}"]),
                          tmp / f"r{next(counter)}")
                pair[mode] = rec["train_seconds"]
                secs[mode].append(rec["train_seconds"])
            ratios.append(pair["cheap"] / pair["off"])
        off, cheap = statistics.median(secs["off"]), statistics.median(secs["cheap"])
        print(f"threads={n}: {steps} steps/run, {repeats} pairs; off {off:.3f} s, cheap "
              f"{cheap:.3f} s (medians); cheap/off per pair: "
              f"{', '.join(f'{r:.3f}' for r in ratios)}; median {statistics.median(ratios):.3f}")


def _timed(fn, repeats: int, device) -> float:
    """Median milliseconds of fn() over repeats (after one warm-up call)."""
    fn()
    out = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        out.append((time.perf_counter() - t) * 1e3)
    return statistics.median(out)


def _model_data_step(name: str, device: torch.device, n: int):
    """The model in train mode, n random CIFAR-shaped examples and their labels, and the median
    ms of a training step (batch 32, SGD with momentum) on them."""
    from autograd_lab.model.networks import SmallNet, resnet18

    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = (SmallNet() if name == "smallnet" else resnet18()).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x = torch.randn(n, 3, 32, 32, generator=g).to(device)
    y = torch.randint(0, 10, (n,), generator=g).to(device)

    def step():
        opt.zero_grad()
        F.cross_entropy(model(x[:32]), y[:32]).backward()
        opt.step()

    return model, x, y, _timed(step, 20, device)


def cost(models: list[str], device: torch.device, resnet_examples: int) -> None:
    for name in models:
        _cost_one(name, device, resnet_examples)


def _cost_one(name: str, device: torch.device, resnet_examples: int) -> None:
    from autograd_lab.observe.dynamics import (
        has_train_batchnorm,
        per_example_noise,
        sharpness,
        two_batch_noise,
    )

    n_sharp, iters = FULL["sharpness_examples"], FULL["sharpness_iters"]
    n_gns = FULL["gns_batch_size"]
    model, x, y, step_ms = _model_data_step(name, device, n_sharp)
    print(f"{name} on {device}: training step (batch 32) {step_ms:.2f} ms")
    examples = n_sharp if name == "smallnet" or device.type == "cuda" else resnet_examples
    batches = [(x[i:i + 32], y[i:i + 32]) for i in range(0, examples, 32)]
    ms = _timed(lambda: sharpness(model, batches, iters, torch.Generator().manual_seed(1)),
                1 if examples < n_sharp or name != "smallnet" else 3, device)
    note = ""
    if examples < n_sharp:
        ms *= n_sharp / examples
        note = f" (measured on {examples} examples, scaled to {n_sharp})"
    every = FULL["sharpness_every_n_steps"]
    print(f"  sharpness ({n_sharp} examples, {iters} Lanczos iterations): {ms:.0f} ms per "
          f"call{note} = {ms / step_ms:.0f} steps; every {every} steps: "
          f"{ms / (every * step_ms):.1%} of the run")
    every = FULL["gns_every_n_steps"]
    methods = ["two_batch"] if has_train_batchnorm(model) else ["per_example", "two_batch"]
    xs, ys = x[:n_gns], y[:n_gns]
    calls = {"per_example": lambda: per_example_noise(model, xs, ys),
             "two_batch": lambda: two_batch_noise(model, xs, ys, 32)}
    for method in methods:
        fn = calls[method]
        ms = _timed(fn, 3 if name == "smallnet" or device.type == "cuda" else 1, device)
        print(f"  grad noise scale, {method} ({n_gns} draws): {ms:.1f} ms per call = "
              f"{ms / step_ms:.1f} steps; every {every} steps: "
              f"{ms / (every * step_ms):.1%} of the run")


def spectrum_cost(models: list[str], device: torch.device, threads: list[int | None],
                  resnet_examples: int) -> None:
    default_threads = torch.get_num_threads()
    for name in models:
        for n_threads in threads:
            torch.set_num_threads(n_threads or default_threads)
            label = f"{n_threads} thread" if n_threads else f"default ({default_threads}) threads"
            _spectrum_one(name, device, label, resnet_examples)
    torch.set_num_threads(default_threads)


def _spectrum_one(name: str, device: torch.device, label: str, resnet_examples: int) -> None:
    from autograd_lab.observe.curvature import (
        HessianBlock,
        hutchinson_trace,
        lanczos_top_k,
        slq_density,
    )

    n_spec, every = FULL["spectrum_examples"], FULL["spectrum_every_n_steps"]
    k, top_iters = FULL["spectrum_top_k"], FULL["spectrum_top_iters"]
    samples, runs, iters = FULL["hutchinson_samples"], FULL["slq_runs"], FULL["slq_iters"]
    bins = FULL["spectrum_bins"]
    model, x, y, step_ms = _model_data_step(name, device, n_spec)
    examples = n_spec if name == "smallnet" or device.type == "cuda" else resnet_examples
    scale = n_spec / examples
    batches = [(x[i:i + 32], y[i:i + 32]) for i in range(0, examples, 32)]
    repeats = 3 if examples == n_spec and name == "smallnet" else 1
    block = HessianBlock(model, batches)
    gen = torch.Generator().manual_seed(1)
    parts = {
        "graph (forward + first backward)": lambda: HessianBlock(model, batches),
        f"trace ({samples} Rademacher products)": lambda: hutchinson_trace(block, samples, gen),
        f"top-{k} ({top_iters} Lanczos steps)":
            lambda: lanczos_top_k(block.hvp, block.n, k, top_iters, gen, block.like),
        f"density ({runs} x {iters} Lanczos steps, {bins} bins)":
            lambda: slq_density(block, runs, iters, bins, gen)}
    note = f"; measured on {examples} examples, scaled x{scale:g}" if scale != 1 else ""
    print(f"{name} on {device}, {label}: training step (batch 32) {step_ms:.2f} ms; "
          f"spectrum probe on {n_spec} examples{note}:")
    total = 0.0
    for what, fn in parts.items():
        seconds = _timed(fn, repeats, device) * scale / 1e3
        total += seconds
        print(f"  {what}: {seconds:.2f} s per call = {seconds * 1e3 / step_ms:.0f} steps")
    print(f"  whole call: {total:.2f} s = {total * 1e3 / step_ms:.0f} steps; every "
          f"{every} steps: {total * 1e3 / (every * step_ms):.1%} of the run")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=["overhead", "cost", "spectrum", "all"], default="all")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--steps", type=int, default=256, help="steps per overhead run")
    ap.add_argument("--models", nargs="+", default=["smallnet", "resnet18"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--resnet-examples", type=int, default=64)
    ap.add_argument("--spectrum-threads", type=int, nargs="+", default=[1, 0],
                    help="torch threads for --part spectrum (0: torch's default)")
    args = ap.parse_args()
    if args.part in ("overhead", "all"):
        overhead(args.repeats, args.threads, args.steps)
    if args.part in ("cost", "all"):
        torch.set_num_threads(args.threads[0])
        cost(args.models, torch.device(args.device), args.resnet_examples)
    if args.part in ("spectrum", "all"):
        spectrum_cost(args.models, torch.device(args.device),
                      [n or None for n in args.spectrum_threads], args.resnet_examples)


if __name__ == "__main__":
    main()
