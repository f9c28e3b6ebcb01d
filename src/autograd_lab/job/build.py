"""The parts of a run built from its config: data, model with its variants, module, loggers,
callbacks, trainer; HParams and the Custom Scalars layout."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate

from autograd_lab.config.targets import arguments
from autograd_lab.data.loader import CIFARDataModule, load_split_tensors
from autograd_lab.errors import UserError, reason
from autograd_lab.job.board import identifying_hparams, layout
from autograd_lab.job.checkpoint import AtomicCheckpointIO, Checkpointer
from autograd_lab.job.distributed import strategy
from autograd_lab.job.progress import ProgressLines, StepProgressBar
from autograd_lab.job.recorder import RunRecorder
from autograd_lab.job.resumable import numerics
from autograd_lab.job.rundir import group_choices, task_overrides
from autograd_lab.model.module import Classifier
from autograd_lab.model.networks import build_model, prepare_network
from autograd_lab.model.variants import detach_at, freeze, frozen_batchnorms
from autograd_lab.observe.graph_view import TensorBoardGraph
from autograd_lab.observe.memory import MemoryFigures, reset_peaks
from autograd_lab.observe.probes import STATS


class Parts:
    """What `build_parts` made from the config and `_fit` and `_write_record` use."""

    def __init__(self, **kw):
        self.__dict__.update(kw)


def build_parts(cfg, run_dir: Path, record: dict, resumed: dict | None, signals, extra_callbacks,
           progress_bar: bool, loaded) -> Parts:
    """Data, model and its variants, module, loggers and callbacks from the config -> Trainer."""
    import lightning as L


    reset_peaks()
    L.seed_everything(cfg.seed, verbose=False)
    # fail on data problems before any file is written
    datamodule = CIFARDataModule(cfg.data, cfg.seed, tensors=load_split_tensors(cfg.data))
    model, report, det, hooks = build_network(cfg)
    network_record(record, report, det)
    frozen_bn = frozen_batchnorms(model) if cfg.train.freeze_bn_stats else []
    record["numerics"] = run_numerics(cfg)
    prepare_network(model, cfg.model)

    module = Classifier(model, cfg.optim, cfg.train.zero_grad, cfg.eval.grad_mode, frozen_bn,
                        scheduler=make_scheduler(cfg.scheduler),
                        meta={"config": record["config"], "numerics": numerics()},
                        channels_last=bool(cfg.model.get("channels_last", False)),
                        cuda_graph=bool(cfg.trainer.get("cuda_graph", False)))
    user_callbacks = _callbacks(cfg, run_dir)
    loggers = make_loggers(cfg, run_dir, purge_step=resumed["from_step"] if resumed else None)

    recorder = make_recorder(cfg, run_dir, loggers, resumed, report, hparams=_hparams(cfg),
                             varied=_varied_keys(), board_layout=_layout(cfg))
    probes = _probes(cfg.probes, recorder, zero_grad=cfg.train.zero_grad)
    profiler = _profiler(cfg.profiler, run_dir, recorder)
    checkpointer = Checkpointer(run_dir, cfg.checkpoint.every_n_steps, signals, recorder)

    memory = MemoryFigures()
    recorder.memory = memory.figures  # whole-run HParams metrics, filled by the first steps

    graph = TensorBoardGraph(recorder, resumed=resumed is not None)  # after the probes' hooks
    callbacks = [recorder, memory, *probes, *profiler, graph, *user_callbacks, *extra_callbacks]
    if progress_bar == "lines":

        callbacks.append(ProgressLines(recorder, cfg.log.progress_every_s))
    elif progress_bar:
        callbacks.append(StepProgressBar(recorder))
    callbacks.append(checkpointer)  # a Checkpoint callback: Lightning calls it after the others
    # the trainer node's own arguments (any Lightning Trainer argument; config/schema.py refuses
    # the ones that break the harness's contract), then what the harness supplies
    make_trainer = instantiate(arguments(cfg.trainer, "trainer"), _partial_=True,
                               _convert_="all")
    trainer = make_trainer(
        strategy=strategy(cfg, find_unused=bool(cfg.train.detach_at)),
        callbacks=callbacks, logger=loggers or False,
        enable_progress_bar=progress_bar is True, default_root_dir=str(run_dir),
        plugins=[AtomicCheckpointIO(loaded=loaded)])
    return Parts(trainer=trainer, module=module, datamodule=datamodule, recorder=recorder,
                  memory=memory, probes=probes, profiler=profiler, hooks=hooks, cfg=cfg,
                  run_dir=run_dir)


def build_network(cfg) -> tuple:
    """The configured model with its variants applied (train.freeze, train.detach_at): the one
    builder of the training run and of the step-check and graph tools. Returns (model, freeze
    report, detach report or None, hooks to remove once the run ends)."""
    model = build_model(cfg.model)
    report = freeze(model, cfg.train.freeze)
    det, hooks = None, []
    if cfg.train.detach_at:
        handle, det = detach_at(model, cfg.train.detach_at, torch.zeros(1, 3, 32, 32))
        hooks.append(handle)
    return model, report, det, hooks


def make_recorder(cfg, run_dir: Path, loggers: list, resumed: dict | None, report, hparams: dict,
                  varied: set, board_layout: dict) -> RunRecorder:
    """The run's RunRecorder: its HParams (`hparams`, the `varied` keys first), the whole-run
    parameter counts of the freeze `report`, its Custom Scalars layout; on a resume, what other
    callbacks wrote to a CSV log before the kill (LearningRateMonitor)."""
    recorder = RunRecorder(run_dir, cfg.log.flush_every_s, hparams=hparams,
                           resumed_from=resumed["from_step"] if resumed else None,
                           log_lr_every_step=cfg.scheduler.name != "none")
    if resumed:
        recorder.read_killed_csv(loggers)
    recorder.whole_run = {"trainable_params": report.trainable_params,
                          "frozen_params": report.frozen_params}
    recorder.layout, recorder.hparams_differ = board_layout, varied
    return recorder


def network_record(record: dict, report, det) -> None:
    """run.json's `params` (trainable, frozen) and `detach` (what a detach point cut off)."""
    record["params"] = {"trainable": report.trainable_params, "frozen": report.frozen_params,
                        "frozen_names": report.frozen}
    if det is not None:
        record["detach"] = {"module": det.module, "upstream_params": det.upstream_params,
                            "upstream_names": det.upstream}


def _instantiate(node, what: str, base, **kwargs):
    """A Lightning callback or logger from a `_target_` node; one line if it is not one."""
    from hydra.errors import InstantiationException

    target = node.get("_target_") if hasattr(node, "get") else None
    if not target:
        raise UserError(f"{what}: needs a _target_ (a Lightning {base.__name__} class path)")
    try:
        obj = instantiate(node, **kwargs)
    except InstantiationException as e:
        cause = e.__cause__ or e
        raise UserError(f"{what}._target_={target}: cannot be made ({reason(cause)})") from None
    if not isinstance(obj, base):
        raise UserError(f"{what}._target_={target}: not a Lightning {base.__name__} "
                        f"(it is a {type(obj).__module__}.{type(obj).__qualname__})")
    return obj


def _callbacks(cfg, run_dir: Path) -> list:
    """The `callbacks` group: every Lightning callback it names, made by Hydra's instantiate."""
    import lightning as L

    out = []
    for name, node in (cfg.get("callbacks") or {}).items():
        extra = {}
        if hasattr(node, "keys") and "dirpath" in node and node.dirpath is None:
            extra["dirpath"] = str(run_dir / "checkpoints")  # ModelCheckpoint: beside ours
        out.append(_instantiate(node, f"callbacks.{name}", L.Callback, **extra))
    return out


def make_loggers(cfg, run_dir: Path, purge_step: int | None) -> list:
    """The `logger` group: Lightning loggers writing into the run directory."""
    from lightning.pytorch.loggers import Logger

    out = []
    for name, node in (cfg.get("logger") or {}).items():
        extra = {"save_dir": str(run_dir)}
        if purge_step is not None and str(node.get("_target_", "")).endswith(
                "TensorBoardLogger"):
            extra["purge_step"] = purge_step  # TensorBoard drops the killed attempt's events
            _after_earlier_event_files(run_dir)
        out.append(_instantiate(node, f"logger.{name}", Logger, **extra))
    return out


def _after_earlier_event_files(run_dir: Path) -> None:
    """TensorBoard reads a folder's event files in the order of their names, which start with
    the second their writer was made (events.out.tfevents.<second>.<host>.<pid>...). A resumed
    attempt made in the same second as the one it continues (a short run killed at once, a
    notebook that has torch loaded already) could sort first, and its steps would then hide the
    earlier attempt's. Wait, at most a second, until this attempt's file sorts last."""
    import time

    seconds = [int(p.name.split(".")[3]) for p in run_dir.glob("events.out.tfevents.*")
               if len(p.name.split(".")) > 3 and p.name.split(".")[3].isdigit()]
    while seconds and int(time.time()) <= max(seconds):
        time.sleep(0.05)


def make_scheduler(sched):
    """(make(optimizer, total_steps), interval) for the `scheduler` node, or None."""
    if sched.name == "none":
        return None
    horizon = sched.get("horizon")

    def make(optimizer, total_steps: int):
        partial = instantiate(sched.make)
        return partial(optimizer, **({horizon: total_steps} if horizon else {}))

    return make, sched.interval


_DDP_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")


class ddp_environment:
    """Lightning's DDP launcher sets rank variables in this process's environment; put them back
    after the fit, or the next job of a sweep would think it was launched as a rank."""

    def __init__(self, trainer):
        self.trainer = trainer  # a callable: the trainer exists once the block runs

    def __enter__(self):
        self.saved = {k: os.environ.get(k) for k in _DDP_ENV}

    def __exit__(self, *exc):
        import subprocess

        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        # the other ranks end with the fit; wait for them so the next job of a sweep does not
        # overlap them (and end any that hang)
        for proc in getattr(getattr(self.trainer().strategy, "launcher", None), "procs", []):
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
        for k, v in self.saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _probes(node, recorder, zero_grad: bool) -> list:
    """The probes callback from its own node (conf/probes/*.yaml), made by instantiate."""
    if node.mode == "off":
        return []
    make = instantiate(arguments(node, "probes"), _partial_=True, _convert_="all")
    return [make(recorder=recorder, zero_grad=zero_grad)]


def _profiler(node, run_dir, recorder) -> list:
    """The profiler callback from its own node (conf/profiler/*.yaml), made by instantiate."""
    if node.name == "off":
        return []
    make = instantiate(arguments(node, "profiler"), _partial_=True, _convert_="all")
    return [make(run_dir=run_dir, recorder=recorder, trace_dir=run_dir / "profiler")]


def _load_data(cfg):

    return load_split_tensors(cfg.data)


def _hparams(cfg) -> dict:
    """HParams: the keys that name the run (group choices, keys typed or swept)."""

    return identifying_hparams(cfg, group_choices(), task_overrides())


def _varied_keys() -> set:
    """The keys that name this run among others: in a sweep, the ones its job directory is
    named by (swept); for a single run, every key typed."""
    try:
        hc = HydraConfig.get()
    except ValueError:
        return set()
    keys = {o.split("=", 1)[0].lstrip("+~") for o in hc.overrides.task if "=" in o}
    if hc.mode.name == "MULTIRUN":
        keys -= set(hc.job.config.override_dirname.exclude_keys)
    return keys


def _layout(cfg) -> dict:

    try:
        in_sweep = HydraConfig.get().mode.name == "MULTIRUN"
    except ValueError:
        in_sweep = False
    probes = cfg.probes
    return layout(probe_stats=STATS if probes.mode != "off" else (),
                  profiler=cfg.profiler.name != "off", in_sweep=in_sweep,
                  sharpness=probes.mode != "off" and bool(probes.get("sharpness_every_n_steps")),
                  noise_scale=probes.mode != "off" and bool(probes.get("gns_every_n_steps")),
                  spectrum=probes.mode != "off" and bool(probes.get("spectrum_every_n_steps")))


def run_numerics(cfg) -> dict:
    """run.json `numerics`: how this run computes, and whether its curve is bitwise comparable
    with the float32 eager run of the same config. Lower precision rounds differently and
    compiled kernels fuse and reorder float operations, NHWC convolutions sum in another
    order: those curves are close, not equal (README "GPU speed" says how close). A CUDA graph
    replays the eager step's own kernels: bitwise equal under trainer.deterministic=true."""
    precision = str(cfg.trainer.get("precision", "32-true"))
    compiled = bool(cfg.model.get("compile", False))
    nhwc = bool(cfg.model.get("channels_last", False))
    graph = bool(cfg.trainer.get("cuda_graph", False))
    # a graphed Adam is capturable=True (its step count on the device): the eager run it equals
    # bit for bit is the one with optim.capturable=true, not the default
    capturable = graph and "capturable" in cfg.optim and not cfg.optim.capturable
    return {"precision": precision, "compiled": compiled, "channels_last": nhwc,
            "cuda_graph": graph,
            "bitwise_vs_fp32_eager": precision in ("32-true", "32") and not compiled
            and not nhwc and not capturable}

