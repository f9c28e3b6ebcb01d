"""Whether what a run asks of the hardware exists on this machine: the accelerator, the device
count, fp16, CUDA for a CUDA graph or a capturable optimizer. Torch is imported only when the
answer needs it (a device by name, devices > 1, 16-mixed, cuda_graph, capturable)."""

from __future__ import annotations

import os

from autograd_lab.errors import UserError

GRAPH_WITHOUT_CUDA = ("trainer.cuda_graph=true: CUDA graphs need a CUDA GPU "
                      "(torch.cuda.is_available() is False here); use trainer.cuda_graph=false")
CAPTURABLE_ON_CPU = ("optim.capturable=true: Adam's capturable step needs its tensors on a CUDA "
                     "GPU (there is none, or trainer.accelerator=cpu); use "
                     "optim.capturable=false")


def check_devices(cfg) -> None:
    """The accelerator, device count and precision exist here, and CUDA for a CUDA graph or
    optim.capturable. Imports torch only for those, a device by name, devices > 1, 16-mixed."""
    trainer = cfg.get("trainer") or {}
    accelerator, devices = trainer.get("accelerator", "auto"), trainer.get("devices", 1)
    fp16 = trainer.get("precision") == "16-mixed"
    cuda_graph = trainer.get("cuda_graph") is True
    capturable = (cfg.get("optim") or {}).get("capturable") is True
    if fp16 and accelerator == "cpu":  # Lightning would run bf16-mixed instead, with a warning
        raise UserError(_FP16_ON_CPU)
    if accelerator in ("auto", "cpu") and devices == 1 and not (fp16 or cuda_graph or capturable):
        return

    import torch

    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise UserError(f"trainer.accelerator={accelerator}: no CUDA GPU on this machine; "
                        f"choices here: auto, cpu")
    if accelerator == "mps" and not torch.backends.mps.is_available():
        raise UserError("trainer.accelerator=mps: no Apple GPU on this machine; choices here: "
                        "auto, cpu")
    if cuda_graph and not torch.cuda.is_available():  # validate refused what it cannot hold
        raise UserError(GRAPH_WITHOUT_CUDA)
    gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    if capturable and not gpu:
        raise UserError(CAPTURABLE_ON_CPU)
    if fp16 and not gpu:
        raise UserError(_FP16_ON_CPU)
    have = torch.cuda.device_count() if gpu else (os.cpu_count() or 1)
    if devices > have:
        what = "GPUs" if gpu else "CPU cores (one process each)"
        raise UserError(f"trainer.devices={devices}: this machine has {have} {what}; give "
                        f"trainer.devices <= {have}")


_FP16_ON_CPU = ("trainer.precision=16-mixed: fp16 mixed precision needs a CUDA GPU (on a CPU "
                "Lightning would run bf16-mixed under the 16-mixed name); choices here: "
                "32-true, bf16-mixed")
