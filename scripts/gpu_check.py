"""What the harness does on a CUDA GPU: device choice, memory record, throughput, exactness, resume.

Not part of the test suite (CI has no GPU). Run on a machine with one:

    python scripts/gpu_check.py [--data-root DIR] [--out FILE] [--only graph,stacked]

1. `trainer.accelerator=auto` picks the GPU; the run record says `cuda:0` and has peak CUDA memory.
2. Throughput, side by side in this process: a plain PyTorch loop over resident batches (b) and
   the harness (c), for SmallNet (batch 32) and ResNet18 (batch 128); prints c/b.
3. Exactness: the harness's per-step losses against a plain loop from the same weights
   (cuDNN deterministic), max absolute difference.
4. Kill and resume on the GPU: a SIGTERM mid-epoch, the same call again, the curve compared with
   an uninterrupted run.
5. Determinism: two uninterrupted runs and a kill/resume, with default kernels and with
   `trainer.deterministic=true`.
6. Per-job memory: freeze_study's variants (ResNet18) in one order and in the reverse order in
   one process: the exact byte counts (run.json `memory`) are the same, peak CUDA memory is
   reset per job.
7. Graph exactness (`trainer.cuda_graph=true`, model/graphed.py), under
   `trainer.deterministic=true`, SmallNet: the curve with the step captured and replayed is
   bitwise equal to the eager run's, for zero_grad on and off, frozen_early, detach_shallow,
   an epoch schedule (captured again each epoch) and Adam (against the eager run of
   `optim.capturable=true`, the kernels a captured Adam needs), bf16-mixed and probes=full;
   then a kill (SIGTERM after
   replayed steps) and resume with the graph against the uninterrupted eager run. Prints each
   max |diff|, the number of replays and PASS/FAIL. `--only graph` runs this section alone.
8. Stacked seeds (`hydra/launcher=stacked`) on the GPU: 4 seeds x zero_grad on/off as two
   stacks against the same 8 jobs run one by one (the basic launcher), through the CLI: with
   zero_grad every member's train/loss and validation rows within 1e-5 relative of its
   separate run (PASS/FAIL); without it (a chaotic run: rounding differences grow) the largest
   difference is printed. `--only stacked` runs this section alone.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_exactness import cfg_of, graph_exactness, stacked_exactness  # noqa: E402  (7, 8)


def plain_loop(cfg, steps: int):
    """b: resident tensors on the GPU, the same model and optimiser, no framework."""
    import torch
    import torch.nn.functional as F

    from autograd_lab.data.loader import load_split_tensors, normalize
    from autograd_lab.model.module import build_optimizer
    from autograd_lab.model.networks import build_model

    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model).cuda().train()
    opt = build_optimizer(model.parameters(), cfg.optim)
    t = load_split_tensors(cfg.data)
    x, y = t["train_x"].cuda(), t["train_y"].cuda()
    b = cfg.data.batch_size
    losses = []
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    order = torch.randperm(len(x), device="cuda")
    for i in range(steps):
        idx = order[(i * b) % len(x):(i * b) % len(x) + b]
        opt.zero_grad()
        loss = F.cross_entropy(model(normalize(x[idx])), y[idx])
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    torch.cuda.synchronize()
    return steps * b / (time.perf_counter() - t0)


class _Clock:
    """Wall time of each training epoch, synchronised with the GPU at both ends."""

    def __init__(self):
        self.times: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module):
        import torch

        torch.cuda.synchronize()
        self.t0 = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        import torch

        torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self.t0)


def EpochClock():  # noqa: N802 - a Lightning callback made on demand (Lightning imported late)
    import lightning as L

    return type("EpochClock", (_Clock, L.Callback), {})()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", default=tempfile.mkdtemp(prefix="gpu_check_data_"))
    p.add_argument("--out", default=None)
    p.add_argument("--only", default=None,
                   help="comma list of sections to run alone: graph (7. graph exactness and "
                        "kill/resume), stacked (8. stacked members against separate runs)")
    args = p.parse_args()

    import lightning as L
    import torch

    from autograd_lab.train import run

    assert torch.cuda.is_available(), "no CUDA device"
    out: dict = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__}
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    root = args.data_root
    if args.only:
        only = set(args.only.split(","))
        if only - {"graph", "stacked"}:
            raise SystemExit(f"--only {args.only}: sections are graph, stacked")
        if "graph" in only:
            out["graph"] = graph_exactness(root, work)
        if "stacked" in only:
            out["stacked"] = stacked_exactness(root, work)
        _finish(out, args)
        return

    # 1. device choice and the memory record
    rec = run(cfg_of("trainer.max_epochs=1", data_root=root), work / "auto")
    out["auto"] = {k: rec.get(k) for k in ("status", "device", "peak_cuda_mib", "images_per_s")}
    print("1. accelerator=auto:", out["auto"], flush=True)

    # 2. throughput, plain loop vs harness
    out["throughput"] = {}
    for model, batch, size in (("smallnet", 32, 50000), ("resnet18", 128, 20000)):
        cfg = cfg_of(f"model={model}", f"data.batch_size={batch}", f"data.train_size={size}",
                     "trainer.max_epochs=3", "trainer.limit_val_batches=0", data_root=root)
        steps = size // batch
        plain_loop(cfg, 20)  # warm-up: cuDNN autotune, allocator
        b = max(plain_loop(cfg, steps) for _ in range(2))
        clock = EpochClock()
        run(cfg, work / f"tp_{model}", callbacks=[clock])
        c = steps * batch / min(clock.times[1:])  # warm epochs only, as b
        out["throughput"][model] = {"b_img_s": round(b), "c_img_s": round(c),
                                    "c_over_b": round(c / b, 3)}
        print(f"2. {model} batch {batch}:", out["throughput"][model], flush=True)

    # 3. exactness against a plain loop from the same seed (same initial weights)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    cfg = cfg_of("data.train_size=640", "data.shuffle=false", "trainer.max_epochs=1",
                 "trainer.limit_val_batches=0", data_root=root)
    rec = run(cfg, work / "exact")
    import pandas as pd
    import torch.nn.functional as F

    from autograd_lab.data.loader import load_split_tensors, normalize
    from autograd_lab.model.module import build_optimizer
    from autograd_lab.model.networks import build_model

    frame = pd.read_parquet(work / "exact" / "metrics.parquet")
    harness = frame[frame.name == "train/loss"].sort_values("step").value.to_numpy()
    L.seed_everything(cfg.seed, verbose=False)
    model = build_model(cfg.model).cuda().train()
    opt = build_optimizer(model.parameters(), cfg.optim)
    t = load_split_tensors(cfg.data)
    x, y = t["train_x"].cuda(), t["train_y"].cuda()
    plain = []
    for i in range(0, len(x), cfg.data.batch_size):
        opt.zero_grad()
        b = cfg.data.batch_size
        loss = F.cross_entropy(model(normalize(x[i:i + b])), y[i:i + b])
        loss.backward()
        opt.step()
        plain.append(loss.item())
    diff = float(abs(torch.tensor(plain) - torch.tensor(harness)).max())
    out["exactness_max_abs_diff"] = diff
    print(f"3. harness vs plain loop on GPU, {len(plain)} steps: max |diff| = {diff:.3g}",
          flush=True)

    # 4. kill and resume on the GPU
    class Term(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 13:
                os.kill(os.getpid(), signal.SIGTERM)

    over = ("data.train_size=640", "trainer.max_epochs=2", "train.zero_grad=false")
    ref = run(cfg_of(*over, data_root=root), work / "ref")
    try:
        run(cfg_of(*over, data_root=root), work / "cut", callbacks=[Term()])
    except SystemExit as e:
        code = e.code
    else:
        code = None
    res = run(cfg_of(*over, data_root=root), work / "cut")

    def curve(d):
        f = pd.read_parquet(d / "metrics.parquet")
        return f[f.name == "train/loss"].sort_values("step").value.to_numpy()

    a, b = curve(work / "ref"), curve(work / "cut")
    out["resume"] = {"exit": code, "status": res["status"],
                     "from_step": res["resumed"]["from_step"],
                     "steps": [len(a), len(b)], "bitwise_equal": bool((a == b).all()),
                     "max_abs_diff": float(abs(a - b).max()), "ref_status": ref["status"]}
    print("4. kill/resume on GPU:", out["resume"], flush=True)
    # 5. the same at the tests' settings (zero_grad on, SIGTERM at step 4): default kernels vs
    #    trainer.deterministic=true; and two uninterrupted default runs, as the baseline
    over = ("data.train_size=320", "data.test_size=128", "trainer.max_epochs=3",
            "probes=cheap")

    class Term4(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 4:
                os.kill(os.getpid(), signal.SIGTERM)

    out["determinism"] = {}
    for mode in ("false", "true"):
        # back to PyTorch's defaults (section 3 asked cuDNN for deterministic kernels)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = False, False
        o = (*over, f"trainer.deterministic={mode}")
        run(cfg_of(*o, data_root=root), work / f"d{mode}_ref")
        run(cfg_of(*o, data_root=root), work / f"d{mode}_ref2")
        try:
            run(cfg_of(*o, data_root=root), work / f"d{mode}_cut", callbacks=[Term4()])
        except SystemExit:
            pass
        run(cfg_of(*o, data_root=root), work / f"d{mode}_cut")
        ref, ref2, cut = (curve(work / f"d{mode}_{k}") for k in ("ref", "ref2", "cut"))
        out["determinism"][f"deterministic={mode}"] = {
            "two_runs_equal": bool((ref == ref2).all()),
            "resumed_equal": bool((ref == cut).all()),
            "resumed_max_abs_diff": float(abs(ref - cut).max())}
    print("5. determinism on GPU:", out["determinism"], flush=True)

    # 6. per-job memory figures on the GPU: freeze_study's variants in one order, then the
    #    reverse, in this one process: the exact byte counts must not depend on the order, and
    #    peak CUDA memory is reset per job
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = False, False
    figures: dict = {}
    variants = ["none", "frozen_backbone", "frozen_early"]
    for i, order in enumerate((variants, variants[::-1])):
        for v in order:
            r = run(cfg_of("model=resnet18", f"variant={v}", "data.train_size=512",
                           "data.test_size=256", "trainer.max_epochs=1", data_root=root),
                    work / f"mem{i}_{v}")
            figures.setdefault(v, []).append(
                (r["memory"], r.get("peak_cuda_mib"), r.get("val_peak_cuda_mib"),
                 r.get("seconds_per_step")))
    out["memory"] = {v: {"exact_bytes_equal_in_both_orders": a[0] == b[0], "memory": a[0],
                         "peak_cuda_mib": [a[1], b[1]], "val_peak_cuda_mib": [a[2], b[2]],
                         "seconds_per_step": [a[3], b[3]]}
                     for v, (a, b) in figures.items()}
    print("6. per-job memory on GPU:", json.dumps(out["memory"]), flush=True)

    # 7. the step as a CUDA graph: bitwise against the eager step, and a kill/resume
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = False, False
    out["graph"] = graph_exactness(root, work)
    # 8. stacked seeds against separate runs
    out["stacked"] = stacked_exactness(root, work)
    _finish(out, args)


def _finish(out: dict, args) -> None:
    text = json.dumps(out, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
