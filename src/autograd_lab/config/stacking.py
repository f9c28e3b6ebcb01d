"""What a stacked sweep (`hydra/launcher=stacked`) can train, told without torch: checked for
every job by the CLI's preflight before Hydra makes any folder, and again by the launcher."""

from __future__ import annotations

from omegaconf import OmegaConf

NAME = "hydra/launcher=stacked"

# optimizers whose step treats every element on its own (each member's slice its own step)
ELEMENTWISE = ("torch.optim.SGD", "torch.optim.Adam", "torch.optim.AdamW")

# key -> (allowed?, why not and what to use instead)
SUPPORTED = (
    ("model.name", lambda v: v == "smallnet", "the stack has no place for BatchNorm running "
     "statistics (resnet18 has them); stacked networks are model=smallnet"),
    ("model.activation", lambda v: v == "relu", "the hand-written autograd Function has no "
     "vmap rule; use model.activation=relu"),
    ("model.compile", lambda v: not v, "a compiled stack is not supported; use "
     "model.compile=false"),
    ("model.channels_last", lambda v: not v, "use model.channels_last=false"),
    ("optim._target_", lambda v: v in ELEMENTWISE, "one optimizer steps every member's slice "
     "of the stacked tensors, which is each member's own step only for an elementwise "
     "optimizer: " + ", ".join(ELEMENTWISE)),
    ("trainer.precision", lambda v: str(v) in ("32-true", "32"), "stacked members train in "
     "float32 (trainer.precision=32-true)"),
    ("trainer.cuda_graph", lambda v: not v, "use trainer.cuda_graph=false"),
    ("trainer.strategy", lambda v: v == "auto", "one process, one device: trainer=default"),
    ("trainer.devices", lambda v: v in (1, "1", "auto"), "one device: trainer.devices=1"),
    ("probes.mode", lambda v: v == "off", "probes measure one network per step; use "
     "probes=off"),
    ("profiler.name", lambda v: v == "off", "use profiler=off"),
    ("callbacks", lambda v: not v, "Lightning callbacks act on one run's metrics; use "
     "callbacks=none"),
    ("ckpt_path", lambda v: v is None, "members resume from their own checkpoints; use "
     "ckpt_path=null"),
)


_GROUPS = {"model.name": "model", "probes.mode": "probes", "profiler.name": "profiler"}


def is_stacked(overrides) -> bool:
    """Whether these command-line overrides choose the stacked launcher."""
    return any(str(o).strip().lstrip("+") == NAME for o in overrides)


def probes_typed(overrides) -> bool:
    """Whether the command line chooses probes (else a stacked sweep runs with probes=off)."""
    return any(str(o).split("=", 1)[0].lstrip("+~") == "probes" for o in overrides)


def stack_overrides(args: list[str], multirun: bool) -> list[str]:
    """A stacked sweep trains with probes off: `probes=off` added, as if typed, right after
    hydra/launcher=stacked where no probes is typed, so the sweep's folder name says so (the
    same sweep with probes is other runs, in another folder). Every path applies it: the CLI,
    al.multirun and the preflight."""
    if not multirun or not is_stacked(args) or probes_typed(args):
        return list(args)
    at = next(i for i, a in enumerate(args) if is_stacked([a]))
    return [*args[:at + 1], "probes=off", *args[at + 1:]]


def refusal(cfg) -> str | None:
    """Why this job cannot train in a stack (one line), or None."""
    for key, ok, why in SUPPORTED:
        value = OmegaConf.select(OmegaConf.create(cfg) if isinstance(cfg, dict) else cfg, key,
                                 default=None)
        if not ok(value):
            shown = (",".join(value) if key == "callbacks" else str(value).lower()
                     if isinstance(value, bool) else value)
            key = _GROUPS.get(key, key)
            return (f"{NAME}: {key}={shown}: {why}; a stack supports zero_grad on/off, "
                    f"train.freeze and train.detach_at (the basic launcher runs the rest)")
    return None
