"""Train a group of runs that differ only in `seed` as one program (hydra/launcher=stacked):
one Lightning fit of a StackedClassifier, each member still a run of its own: its run
directory, lock, run.json, metrics.parquet, TensorBoard events and checkpoint, exactly where and
as a separate run writes them, so summaries, TensorBoard, resume and skip see separate runs.

Members whose checkpoints stand at different steps (a member added to a sweep later) train as
separate stacks, one per resume point."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

import autograd_lab.job.messages as messages
from autograd_lab.config.targets import arguments
from autograd_lab.data.loader import load_split_tensors
from autograd_lab.data.stacked import StackedDataModule
from autograd_lab.disk.lock import RunLock
from autograd_lab.errors import UserError, error_text
from autograd_lab.job.board import identifying_hparams, layout
from autograd_lab.job.build import (
    Parts,
    build_network,
    make_loggers,
    make_recorder,
    make_scheduler,
    network_record,
    run_numerics,
)
from autograd_lab.job.checkpoint import Checkpointer, RunInterrupted, StopSignals
from autograd_lab.job.distributed import strategy
from autograd_lab.job.fit import fit_run, reserve_space, resume_point, stop_reason
from autograd_lab.job.progress import ProgressLines, StepProgressBar
from autograd_lab.job.record import new_record, write_record
from autograd_lab.job.resumable import numerics
from autograd_lab.job.rundir import record_failure
from autograd_lab.job.runner import quiet_libraries
from autograd_lab.job.stacked_members import (
    StackedCheckpointIO,
    StackMembers,
    member_checkpoint_problem,
    stack_checkpoint,
)
from autograd_lab.model.networks import build_model
from autograd_lab.model.stacked import StackedClassifier, StackedNet
from autograd_lab.observe.memory import MemoryFigures, reset_peaks


class Member:
    """One job of a stacked group, as the launcher planned it: its composed config, run
    directory, and what Hydra knew of it (overrides, group choices, the keys its sweep varies)."""

    def __init__(self, cfg, run_dir: Path, overrides: list[str], choices: dict, varied: set):
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.overrides, self.choices, self.varied = overrides, choices, varied
        self.config = OmegaConf.to_container(cfg, resolve=True)
        self.record: dict | None = None


def train_group(members: list[Member], progress_bar) -> None:
    """Train the members (one group: configs equal but for the seed); each gets its record in
    `member.record` and on disk. A stop signal ends the group, every member saved, and exits
    128 + the signal once every record is written."""
    quiet_libraries()
    threads = members[0].cfg.threads
    if threads:
        torch.set_num_threads(threads)  # set, not hoped (as a separate run)
    exit_code = None
    with contextlib.ExitStack() as locks, StopSignals() as signals:
        points: dict = {}
        shapes = _parameter_shapes(members[0].cfg)
        for m in members:  # a member that cannot start fails alone, as a separate run would
            try:
                locks.enter_context(RunLock(m.run_dir))
                m.ckpt_path, m.resumed, m.ckpt = resume_point(m.cfg, m.run_dir, m.config)
                why = member_checkpoint_problem(m.ckpt, shapes) if m.ckpt else None
                if why:
                    raise UserError(f"checkpoint {m.ckpt_path} does not fit this run: {why}; "
                                    f"delete it (or run with resume=false) to start over")
            except RunInterrupted as e:
                raise SystemExit(e.exit_code) from None
            except UserError as e:
                _failed_to_start(m, e)
                continue
            reserve_space(m.run_dir)
            messages.starting(m.run_dir, m.resumed)
            points.setdefault(m.resumed["from_step"] if m.resumed else None, []).append(m)
        load = messages.busy_machine(torch.get_num_threads()) if points else None
        for stack in points.values():
            code = _train_stack(stack, signals, progress_bar, load)
            exit_code = exit_code or code
            if exit_code:
                break
    if exit_code:
        raise SystemExit(exit_code)


def _parameter_shapes(cfg) -> dict[str, tuple]:
    """{name: shape} of the configured network's parameters (built on the meta device)."""
    node = OmegaConf.merge(cfg.model, {"weights_path": None})  # shapes only: no file read
    with torch.device("meta"):
        model = build_model(node)
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


def _failed_to_start(m: Member, e: UserError) -> None:
    """A member whose folder or checkpoint refuses it (another process's lock, a damaged
    checkpoint): its one line and its failed run.json (not over another process's files)."""
    print(f"autograd-lab: job failed: {m.run_dir}: {e}", file=sys.stderr)
    if not getattr(e, "leave_alone", False):
        record_failure(m.run_dir, m.config, str(e), m.overrides, m.choices)
    m.record = {"status": "failed", "error": str(e)}


def _train_stack(members: list[Member], signals, progress_bar, load) -> int | None:
    """One fit for members at the same resume point; their records written, whatever happens.
    Returns the exit code of a stop signal, or None."""
    t0 = time.perf_counter()
    for i, m in enumerate(members):
        m.record = new_record(m.config, m.resumed, load, m.overrides, m.choices)
        m.record["stacked"] = {"members": len(members), "index": i,
                               "seeds": [x.cfg.seed for x in members],
                               "runs": [x.run_dir.name for x in members]}
    state = SimpleNamespace(parts=None, scratch={"status": "failed", "error": None})
    try:
        state.parts = _build(members, signals, progress_bar)
        fit_run(state.parts, members[0].ckpt_path if members[0].resumed else None,
                state.scratch)
    except RunInterrupted as e:  # a signal while building: nothing to save yet
        state.scratch.update(status="interrupted", error=str(e), _exit_code=e.exit_code)
    except BaseException as e:
        state.scratch["error"] = error_text(e)
        for m in members:
            m.record["error"] = state.scratch["error"]
        e.reported = True  # each member's end line says it
        raise
    finally:
        signals.finishing = True
        _finish(members, state, t0)
        signals.finishing = False
    if state.scratch["status"] == "interrupted":
        return state.scratch.get("_exit_code")
    # a signal while the records were written (noted, not acted on then): the sweep stops here
    return 128 + signals.requested if signals.requested else None


def _build(members: list[Member], signals, progress_bar) -> Parts:
    """Each member's network from its own seed (the weights its separate run starts from), the
    stack, its data, the members' recorders and loggers, and the trainer."""
    cfg = members[0].cfg
    reset_peaks()  # the stack's peaks, not those of the sweep's earlier jobs
    tensors = None
    nets = []
    for m in members:
        L.seed_everything(m.cfg.seed, verbose=False)  # as build_parts: seed, data, network
        tensors = tensors or load_split_tensors(m.cfg.data)
        model, report, det, hooks = build_network(m.cfg)
        network_record(m.record, report, det)
        m.record["numerics"] = {**run_numerics(m.cfg), "bitwise_vs_fp32_eager": False,
                                "stacked": True}
        nets.append(model)
        m.report = report
    net = StackedNet(nets)
    module = StackedClassifier(net, cfg.optim, cfg.train.zero_grad, cfg.eval.grad_mode, [],
                               scheduler=make_scheduler(cfg.scheduler),
                               meta={"config": members[0].config, "numerics": numerics()})
    recorders, loggers = [], []
    for m in members:
        purge = m.resumed["from_step"] if m.resumed else None
        m.loggers = make_loggers(m.cfg, m.run_dir, purge_step=purge)
        recorders.append(make_recorder(
            m.cfg, m.run_dir, m.loggers, m.resumed, m.report,
            hparams=identifying_hparams(m.cfg, m.choices, m.overrides), varied=m.varied,
            board_layout=layout(in_sweep=True)))
        loggers.append(m.loggers)
    fan = StackMembers(recorders, loggers)
    loaded = None
    if members[0].resumed:
        loaded = stack_checkpoint([m.ckpt for m in members], net.names)
    io = StackedCheckpointIO([m.run_dir for m in members],
                             [{"config": m.config, "numerics": numerics()} for m in members],
                             net.names, loaded=loaded)
    io.members = fan
    checkpointer = Checkpointer(members[0].run_dir, cfg.checkpoint.every_n_steps, signals, fan)
    memory = MemoryFigures()  # the stack's exact byte counts; each member's share in run.json
    for r in recorders:  # and in its HParams' whole_run metrics
        r.memory = _Share(memory.figures, len(members))
    callbacks = [fan, memory]
    if progress_bar == "lines":
        callbacks.append(ProgressLines(recorders[0], cfg.log.progress_every_s))
    elif progress_bar:
        callbacks.append(StepProgressBar(recorders[0]))
    callbacks.append(checkpointer)
    make_trainer = instantiate(arguments(cfg.trainer, "trainer"), _partial_=True,
                               _convert_="all")
    trainer = make_trainer(strategy=strategy(cfg, find_unused=False), callbacks=callbacks,
                           logger=False, enable_progress_bar=progress_bar is True,
                           default_root_dir=str(members[0].run_dir), plugins=[io])
    fan.attach(trainer, module)
    datamodule = StackedDataModule(cfg.data, [m.cfg.seed for m in members], tensors=tensors)
    return Parts(trainer=trainer, module=module, datamodule=datamodule, recorder=fan,
                 members=fan, memory=memory, cfg=cfg, run_dir=members[0].run_dir)


class _Share(Mapping):
    """A member's share of the stack's memory figures (each exact byte count / members), read
    when asked: the figures are measured during the first steps."""

    def __init__(self, figures: dict, members: int):
        self.figures, self.members = figures, members

    def __getitem__(self, key):
        return self.figures[key] // self.members

    def __iter__(self):
        return iter(self.figures)

    def __len__(self):
        return len(self.figures)


def _finish(members: list[Member], state, t0: float) -> None:
    """Every member's outcome, run.json and metrics.parquet; its loggers closed."""
    failure = None
    for i, m in enumerate(members):  # one member's failing writes never cost the others theirs
        try:
            _finish_member(i, m, members, state, t0)
        except Exception as e:
            print(f"autograd-lab: {m.run_dir}: its record was not written: {error_text(e)}",
                  file=sys.stderr)
            failure = failure or e
    if failure is not None and state.scratch["status"] != "failed":
        raise failure


def _finish_member(i: int, m: Member, members: list[Member], state, t0: float) -> None:
    """Member i's outcome, run.json and metrics.parquet; its loggers closed; its end line."""
    scratch, parts = state.scratch, state.parts
    record = m.record
    record.update({k: v for k, v in scratch.items() if k in ("status", "error",
                                                           "_exit_code", "world_size",
                                                           "device", "_write_failed")})
    member_parts = None
    if parts is not None:
        recorder = parts.members.recorders[i]
        view_trainer, view_module = parts.members.views[i]
        if scratch["status"] in ("completed", "diverged"):  # each member its own outcome
            diverged = recorder.diverged_at
            record["status"] = "diverged" if diverged is not None else "completed"
            record["error"] = (f"non-finite loss at step {diverged}"
                               if diverged is not None else None)
            record["stop_reason"] = stop_reason(parts.trainer, m.cfg, diverged)
        stack = dict(parts.memory.figures)
        record["stacked"]["memory"] = stack
        share = SimpleNamespace(figures=dict(_Share(stack, len(members))))
        member_parts = Parts(hooks=[], recorder=recorder, trainer=view_trainer,
                             module=view_module, memory=share,
                             profiler=[], probes=[], cfg=m.cfg, run_dir=m.run_dir)
    write_record(member_parts, record, m.run_dir, t0, True)
    for logger in getattr(m, "loggers", []):
        with contextlib.suppress(Exception):
            logger.finalize("success" if record["status"] == "completed" else "failed")
    if not record.get("_write_failed"):
        messages.ended(record, m.run_dir)
