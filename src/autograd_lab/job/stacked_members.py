"""Each member of a stacked group as a run of its own: its own RunRecorder writing its own
loggers (TensorBoard in its run directory) and metrics.parquet, and its own checkpoint file.

The recorder is the single run's, unchanged: it sees the stacked trainer and module through
two small views (MemberTrainer, MemberModule) that show this member's losses, validation row
and loggers. StackedCheckpointIO turns each checkpoint Lightning makes of the stack into one
file per member, in the single run's layout (parameter names `model.<name>`, the member's
optimizer state, `.grad`, recorder rows, config), and puts the stack back together from those
files on resume.
"""

from __future__ import annotations

import io
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO

from autograd_lab.disk.files import atomic_write_bytes
from autograd_lab.disk.formats import CHECKPOINT
from autograd_lab.job.recorder import RunRecorder


class MemberTrainer:
    """The stacked trainer as member i's recorder sees it: its own loggers and stop flag (a
    diverged member stops alone), one process, everything else the stack's."""

    world_size = 1
    is_global_zero = True

    def __init__(self, trainer, loggers: list):
        self._trainer, self.loggers, self.should_stop = trainer, loggers, False

    def __getattr__(self, name):
        return getattr(self._trainer, name)


class MemberModule:
    """The stacked module as member i's recorder sees it: its losses (handed out by the
    StackMembers callback, one host copy for all members) and its validation row."""

    def __init__(self, members: StackMembers, module, index: int):
        self._members, self._module, self.index = members, module, index
        self._pending: list = []

    @property
    def step_losses(self) -> list:
        self._members.hand_out()
        return self._pending

    def phase(self, name: str):
        return self._module.phase(name)

    def val_metrics(self) -> torch.Tensor:
        return self._module.val_metrics()[self.index]

    @property
    def val_peak_mib(self) -> float:
        return self._module.val_peak_mib

    @property
    def cuda_peak_mib(self) -> float:  # the stack's (run.json peak_cuda_mib, on a GPU)
        return self._module.cuda_peak_mib


_HOOKS = ("on_train_start", "on_train_epoch_start", "on_train_batch_start",
          "on_train_batch_end", "on_validation_epoch_start", "on_validation_epoch_end",
          "on_train_epoch_end", "on_train_end", "on_exception", "teardown")


class StackMembers(L.Callback):
    """Calls every member recorder's Lightning hooks with its member's views. Training stops
    when every member has diverged; a member that diverged alone stops getting rows."""

    def __init__(self, recorders: list[RunRecorder], loggers: list[list]):
        self.recorders, self.member_loggers = recorders, loggers
        self.views: list[tuple[MemberTrainer, MemberModule]] = []
        self._module = None

    def attach(self, trainer, module) -> None:
        """The members' views of the stacked trainer and module, made with them (the record
        reads them however early the fit ends)."""
        self._module = module
        self.views = [(MemberTrainer(trainer, lg), MemberModule(self, module, i))
                      for i, lg in enumerate(self.member_loggers)]

    def setup(self, trainer, pl_module, stage):
        for r, (t, m) in zip(self.recorders, self.views, strict=True):
            r.setup(t, m, stage)

    def hand_out(self) -> None:
        """The stack's pending [N] losses -> each member's list, with one host copy."""
        pending = self._module.step_losses if self._module is not None else []
        if not pending:
            return
        values = torch.stack(pending).cpu()
        pending.clear()
        for r, (_, m) in zip(self.recorders, self.views, strict=True):
            if r.diverged_at is None:  # its curve ended at the divergence
                m._pending.extend(values[:, m.index].unbind())

    @property
    def diverged_at(self) -> int | None:
        """A step once every member has diverged (the Checkpointer then saves nothing)."""
        steps = [r.diverged_at for r in self.recorders]
        return None if None in steps else max(steps)

    def flush(self, trainer=None, pl_module=None) -> None:
        """Before a checkpoint (the Checkpointer calls it): every member's rows written and its
        loggers' files saved, so a run continued from the file finds every earlier step."""
        for r, (t, m) in zip(self.recorders, self.views, strict=True):
            r.flush(t, m)
            for logger in t.loggers:
                logger.save()

    def _each(self, hook: str, trainer, *args) -> None:
        if hook in ("on_train_batch_start", "on_train_batch_end"):
            # a member's batch as its recorder reads it (len(batch[1]): its B images), made
            # once a step without touching the tensors: labels are [N, B]
            *head, batch, idx = args
            args = (*head, (None, range(batch[1].shape[-1])), idx)
        for r, (t, m) in zip(self.recorders, self.views, strict=True):
            if r.diverged_at is not None and hook not in ("teardown", "on_exception"):
                continue  # its run ended at the divergence: no rows, times or rates after it
            getattr(r, hook)(t, m, *args)
        if hook == "on_train_batch_end" and all(t.should_stop for t, _ in self.views):
            trainer.should_stop = True

    def state_dict(self) -> dict:
        return {"members": [r.state_dict() for r in self.recorders]}

    def load_state_dict(self, state: dict) -> None:
        for r, s in zip(self.recorders, state["members"], strict=True):
            r.load_state_dict(s)


def _hook(name):
    def call(self, trainer, pl_module, *args, **kwargs):  # teardown gets stage= by name
        self._each(name, trainer, *args, *kwargs.values())
    call.__name__ = name
    return call


for _name in _HOOKS:
    setattr(StackMembers, _name, _hook(_name))


# ------------------------------------------------------------------ one checkpoint per member
class StackedCheckpointIO(CheckpointIO):
    """Lightning's checkpoint of the stack, written as one file per member
    (`<run dir>/checkpoints/last.ckpt`, each atomic), and read back as the stack.

    `run_dirs`, `metas`: each member's run directory and its checkpoint metadata (config,
    numerics); `names`: the stacked parameter names; `loaded`: the stack's checkpoint already
    put together from the members' files (a resume)."""

    def __init__(self, run_dirs: list[Path], metas: list[dict], names: list[str],
                 loaded: dict | None = None):
        super().__init__()
        self.run_dirs, self.metas, self.names, self.loaded = run_dirs, metas, names, loaded
        self.members: StackMembers | None = None  # set once made: who has diverged

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        for i, run_dir in enumerate(self.run_dirs):
            if self.members is not None and self.members.recorders[i].diverged_at is not None:
                continue  # a diverged member keeps its last finite checkpoint
            buf = io.BytesIO()
            torch.save(member_checkpoint(checkpoint, i, self.names, self.metas[i]), buf)
            atomic_write_bytes(run_dir / CHECKPOINT, buf.getvalue())

    def load_checkpoint(self, path, map_location=None, weights_only=None):
        ckpt, self.loaded = self.loaded, None
        return ckpt

    def remove_checkpoint(self, path) -> None:
        Path(path).unlink(missing_ok=True)


def _slice(value, i: int):
    """Member i's part of a stacked state tensor (leading dimension: the members); 0-d
    tensors (Adam's step count) and other values are shared."""
    if isinstance(value, torch.Tensor) and value.dim() > 0:
        return value[i].clone()
    return value


def member_checkpoint(ckpt: dict, i: int, names: list[str], meta: dict) -> dict:
    """Member i's checkpoint in a single run's layout, from the stack's."""
    state = {}
    for key, value in ckpt["state_dict"].items():
        prefix, _, index = key.rpartition(".")
        assert prefix == "model.stacked", key
        state[f"model.{names[int(index)]}"] = value[i].clone()
    optimizers = [{**o, "state": {k: {n: _slice(v, i) for n, v in s.items()}
                                  for k, s in o["state"].items()}}
                  for o in ckpt["optimizer_states"]]
    callbacks = {k: v for k, v in ckpt["callbacks"].items() if k != "StackMembers"}
    callbacks["RunRecorder"] = ckpt["callbacks"]["StackMembers"]["members"][i]
    own = ckpt["autograd_lab"]
    return {**ckpt, "state_dict": state, "optimizer_states": optimizers, "callbacks": callbacks,
            "autograd_lab": {**own, **meta, "stacked_member": i,
                             "grads": [None if g is None else g[i].clone()
                                       for g in own["grads"]]}}


def member_checkpoint_problem(ckpt: dict, shapes: dict[str, tuple]) -> str | None:
    """What makes a member's checkpoint unfit for a stack of this network (parameter names and
    `shapes`), in words, or None: a separate run would refuse it as it loads; a stack checks
    each member first, so one bad file fails that member alone."""
    state = ckpt.get("state_dict") or {}
    want = {f"model.{n}": s for n, s in shapes.items()}
    if set(state) != set(want):
        return "its parameters are not this network's"
    bad = next((k for k, s in want.items() if tuple(state[k].shape) != tuple(s)), None)
    if bad is not None:
        return f"{bad} has shape {tuple(state[bad].shape)}, this network's is {want[bad]}"
    grads = (ckpt.get("autograd_lab") or {}).get("grads")
    if not isinstance(grads, list) or len(grads) != len(shapes) or any(
            g is not None and tuple(g.shape) != tuple(s)
            for g, s in zip(grads, shapes.values(), strict=True)):
        return "its saved .grad does not match this network's parameters"
    if "RunRecorder" not in (ckpt.get("callbacks") or {}):
        return "it has no recorder rows"
    return None


def _stack(values: list):
    first = values[0]
    if isinstance(first, torch.Tensor) and first.dim() > 0:
        return torch.stack(values)
    return first


def stack_checkpoint(ckpts: list[dict], names: list[str]) -> dict:
    """The stack's checkpoint from its members' (member_checkpoint's inverse)."""
    first = ckpts[0]
    state = {f"model.stacked.{j}": torch.stack([c["state_dict"][f"model.{n}"] for c in ckpts])
             for j, n in enumerate(names)}
    optimizers = []
    for o, opt in enumerate(first["optimizer_states"]):
        per = [c["optimizer_states"][o]["state"] for c in ckpts]
        optimizers.append({**opt, "state": {k: {n: _stack([p[k][n] for p in per]) for n in s}
                                            for k, s in opt["state"].items()}})
    callbacks = {k: v for k, v in first["callbacks"].items() if k != "RunRecorder"}
    callbacks["StackMembers"] = {"members": [c["callbacks"]["RunRecorder"] for c in ckpts]}
    grads = [None if g is None else torch.stack([c["autograd_lab"]["grads"][j] for c in ckpts])
             for j, g in enumerate(first["autograd_lab"]["grads"])]
    return {**first, "state_dict": state, "optimizer_states": optimizers,
            "callbacks": callbacks, "autograd_lab": {**first["autograd_lab"], "grads": grads}}
