"""The stacked launcher (`hydra/launcher=stacked`): the jobs of a sweep that differ only in
`seed` train as one vmapped program (job/stacked.py), each still a run of its own.

Planning is Hydra's, job by job: every job's config composed and its folder made and named as
the basic launcher does (Hydra's run_job, so `.hydra/` and the job's folder name are the same),
then what cannot be stacked is refused in one line before any job trains, completed jobs are
skipped, and each group of jobs equal but for the seed trains together. Hydra finds the class
as hydra_plugins.autograd_lab_stacked_launcher.StackedLauncher.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import (
    JobReturn,
    configure_log,
    filter_overrides,
    run_job,
    setup_globals,
)
from omegaconf import OmegaConf, open_dict

from autograd_lab.config.schema import validate
from autograd_lab.config.stacking import refusal
from autograd_lab.errors import EXIT_USER_ERROR, UserError, error_text
from autograd_lab.job.checkpoint import RunInterrupted
from autograd_lab.job.messages import skipped
from autograd_lab.job.rundir import finished_record, group_choices, record_failure, task_overrides
from autograd_lab.job.stacked import Member, train_group

log = logging.getLogger(__name__)

def group_key(config: dict) -> str:
    """Jobs with the same key train as one stack: everything but the seed equal."""
    return json.dumps({k: v for k, v in config.items() if k != "seed"}, sort_keys=True,
                      default=str)


def launch(launcher, job_overrides, initial_job_idx: int) -> list[JobReturn]:
    """Hydra's Launcher.launch for the stacked launcher (see the module's docstring)."""
    setup_globals()
    config, context = launcher.config, launcher.hydra_context
    configure_log(config.hydra.hydra_logging, config.hydra.verbose)
    plans = []
    for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
        sweep_config = context.config_loader.load_sweep_config(config, list(overrides))
        with open_dict(sweep_config):
            sweep_config.hydra.job.id = idx
            sweep_config.hydra.job.num = idx
        task = OmegaConf.masked_copy(sweep_config, [k for k in sweep_config if k != "hydra"])
        try:
            why = refusal(task)
        except Exception:  # a value that does not resolve: the job itself reports it
            why = None
        if why:
            print(f"autograd-lab: error: {why}", file=sys.stderr)
            raise SystemExit(EXIT_USER_ERROR)
        plans.append(sweep_config)
    Path(str(config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)  # every job checked
    log.info(f"Launching {len(plans)} jobs locally, those equal but for the seed as one stack")
    for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
        log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")  # as Hydra's basic
    groups: dict[str, list] = {}  # launcher says it (al.multirun counts these lines)
    returns: list[JobReturn | None] = [None] * len(plans)
    for i, sweep_config in enumerate(plans):
        ret = run_job(hydra_context=context, task_function=_prepare, config=sweep_config,
                      job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")
        returns[i] = ret
        prepared = ret.return_value  # _prepare never raises: its status is COMPLETED
        if isinstance(prepared, Member):
            groups.setdefault(group_key(prepared.config), []).append(i)
        elif isinstance(prepared, _Unprepared):  # said and recorded: the sweep goes on
            print(f"autograd-lab: job failed: {prepared.run_dir}: {prepared.error}",
                  file=sys.stderr)
            ret.return_value = None
    mode = _progress(plans[0]) if plans else False
    for indices in groups.values():
        members = [returns[i].return_value for i in indices]
        try:
            with _group_logging(plans[indices[0]], members):
                train_group(members, mode)
        except RunInterrupted as e:  # a signal outside the fit (taking the locks)
            raise SystemExit(e.exit_code) from None
        except Exception as e:  # recorded in each member's run.json; the sweep goes on
            if not getattr(e, "reported", False):
                print(f"autograd-lab: stacked group failed: {error_text(e)}", file=sys.stderr)
        for i, m in zip(indices, members, strict=True):
            returns[i].return_value = m.record
        configure_log(config.hydra.hydra_logging, config.hydra.verbose)
    return returns


@contextlib.contextmanager
def _group_logging(sweep_config, members):
    """The job logging of the group's first member (its lines on stderr as a job's, and in its
    train.log), and the same lines in every other member's train.log."""
    HydraConfig.instance().set_config(sweep_config)
    configure_log(sweep_config.hydra.job_logging, sweep_config.hydra.verbose)
    root = logging.getLogger()
    own = [h for h in root.handlers if isinstance(h, logging.FileHandler)]
    added = []
    for m in members[1:]:
        handler = logging.FileHandler(m.run_dir / "train.log")
        if own:
            handler.setFormatter(own[0].formatter)
        root.addHandler(handler)
        added.append(handler)
    try:
        yield
    finally:
        for handler in added:
            root.removeHandler(handler)
            handler.close()


class _Unprepared:
    """A job that failed before it could join a stack (a value its run refuses)."""

    def __init__(self, run_dir: Path, error: str):
        self.run_dir, self.error = run_dir, error


def _prepare(cfg) -> Member | dict | _Unprepared:
    """Inside Hydra's run_job for one job (its folder made, HydraConfig its own): check it,
    and skip it if it completed with this config; else what its training needs of Hydra. A
    job that fails here gets its failed run.json and its line, as with the basic launcher."""
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    hc = HydraConfig.get()
    try:
        validate(cfg)
        config = OmegaConf.to_container(cfg, resolve=True)
    except Exception as e:
        error = str(e) if isinstance(e, UserError) else error_text(e)
        if not getattr(e, "leave_alone", False):
            record_failure(run_dir, OmegaConf.to_container(cfg, resolve=False), error,
                           task_overrides(), group_choices())
        return _Unprepared(run_dir, error)
    if cfg.resume:
        done = finished_record(run_dir, config)
        if done is not None:
            skipped(run_dir)
            return done
    varied = {o.split("=", 1)[0].lstrip("+~") for o in hc.overrides.task if "=" in o}
    varied -= set(hc.job.config.override_dirname.exclude_keys)
    return Member(cfg, run_dir, task_overrides(), group_choices(), varied)


def _progress(sweep_config):
    """Lightning's bar in a terminal, plain lines otherwise (trainer.progress_bar decides)."""
    choice = OmegaConf.select(sweep_config, "trainer.progress_bar", default="auto")
    if choice != "auto":
        return bool(choice)
    return True if sys.stderr.isatty() else "lines"
