"""What `trainer.cuda_graph=true` refuses, and why: the combinations a training step captured
once as a CUDA graph and replayed (model/graphed.py) cannot hold. Torch-free; the CUDA check
itself is config.devices.check_devices, which runs after these."""

from __future__ import annotations

from autograd_lab.config.keys import is_int
from autograd_lab.errors import UserError


def cuda_graph_refusals(cfg, trainer) -> list[tuple[bool, str, str, str]]:
    """(refused, the value, why, what to use instead) for each thing a captured training step
    cannot hold. These come before the CUDA check (check_devices), so a machine without a GPU
    names the more specific problem first."""
    sched = cfg.get("scheduler") or {}
    profiler = (cfg.get("profiler") or {}).get("name")
    accelerator, devices = trainer.get("accelerator", "auto"), trainer.get("devices", 1)
    ddp = trainer.get("strategy") == "ddp"
    return [
        (accelerator in ("cpu", "mps"), f"trainer.accelerator={accelerator}",
         "a CUDA graph replays CUDA kernels", "trainer.accelerator=auto or gpu"),
        (ddp or (is_int(devices) and devices > 1),
         "trainer=ddp" if ddp else f"trainer.devices={devices}",
         "DDP all-reduces gradients from autograd hooks, in buckets it rebuilds after the "
         "first steps, not as one fixed sequence of kernels", "one device (trainer=default)"),
        (trainer.get("precision") == "16-mixed", "trainer.precision=16-mixed",
         "fp16's GradScaler reads on the host, at every step, whether the gradients overflowed "
         "(a sync, which capture forbids) and then skips that step",
         "trainer.precision=bf16-mixed (no scaler) or 32-true"),
        (trainer.get("detect_anomaly") is True, "trainer.detect_anomaly=true",
         "anomaly mode checks every backward result for NaN on the host (a sync, which "
         "capture forbids)", "trainer.detect_anomaly=false"),
        ((cfg.get("model") or {}).get("compile") is True, "model.compile=true",
         "pick one: torch.compile makes its own CUDA graphs (mode=reduce-overhead), and its "
         "guards and recompiles run in Python, which a captured step cannot hold",
         "model.compile=false"),
        (profiler == "torch", "profiler=torch",
         "a replayed step shows in a profile as one graph launch, without its forward, "
         "backward and optimizer phases: profile the eager step", "profiler=off"),
        (sched.get("interval") == "step", f"scheduler={sched.get('name')}",
         "its learning rate changes every step, and a captured optimizer step keeps the float "
         "rate it was captured with (torch's SGD has no tensor rate that capture allows; "
         "Adam's would change its arithmetic), so the step would be captured again every step",
         "scheduler=step (an epoch schedule: captured again once an epoch) or scheduler=none"),
    ]


def check_cuda_graph(cfg, trainer) -> None:
    """The first of `cuda_graph_refusals` that applies, as one line (config.schema.validate
    calls this when trainer.cuda_graph=true)."""
    for refused, what, why, instead in cuda_graph_refusals(cfg, trainer):
        if refused:
            raise UserError(f"trainer.cuda_graph=true with {what}: {why}; use {instead}, or "
                            f"trainer.cuda_graph=false")
