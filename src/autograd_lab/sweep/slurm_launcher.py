"""The SLURM launcher (`hydra/launcher=slurm`): submitit's SLURM launcher that skips completed
jobs, requeues preempted ones to continue from their checkpoint, and writes the summary when
the last job ends.

Hydra finds it as hydra_plugins.autograd_lab_slurm_launcher.SlurmLauncher (src/hydra_plugins/:
Hydra imports every module there when it starts), so this module is cheap to import: no torch,
no pandas (the summary job runs `autograd-lab summarize` as a command)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from hydra_plugins.hydra_submitit_launcher.submitit_launcher import (
    SlurmLauncher as _SubmititSlurmLauncher,
)

from autograd_lab.disk.files import write_json
from autograd_lab.errors import UserError
from autograd_lab.job.rundir import finished_record, read_run_json
from autograd_lab.sweep.slurm_queue import (
    DEFAULT_MAX_REQUEUES,
    MARKER,
    _read_text,
    read_marker,
    squeue_states,
)


# ------------------------------------------------------------------ the submitting side
class _Job:
    """One job of the sweep as the launcher sees it."""

    def __init__(self, overrides: list[str], idx: int, run_dir: Path, sweep_config, task_cfg,
                 done: dict | None, active: tuple[str, str] | None):
        self.overrides, self.idx, self.run_dir = overrides, idx, run_dir
        self.sweep_config, self.task_cfg = sweep_config, task_cfg
        self.done, self.active = done, active  # (job id, state) while SLURM has it
        self.job_id: str | None = active[0] if active else None


class SlurmLauncher(_SubmititSlurmLauncher):
    """Hydra's submitit SLURM launcher, plus: `wait` (false: submit and return) and
    `max_requeues` (read by the jobs, see SlurmJob); completed jobs skipped and running ones
    left alone before anything is submitted; waiting by squeue."""

    def __init__(self, wait: bool = True, max_requeues: int = DEFAULT_MAX_REQUEUES, **params):
        super().__init__(**params)
        self.wait, self.max_requeues = bool(wait), int(max_requeues)

    def launch(self, job_overrides, initial_job_idx: int):

        try:
            return self._launch(job_overrides, initial_job_idx)
        except UserError as e:  # one line, not Hydra's traceback (SystemExit passes through)
            print(f"autograd-lab: error: {e}", file=sys.stderr)
            raise SystemExit(1) from None

    def _launch(self, job_overrides, initial_job_idx: int):
        from hydra.core.singleton import Singleton

        assert self.config is not None and self.hydra_context is not None
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        state = Singleton.get_state()  # planning sets HydraConfig per job: put it back after
        try:
            jobs = [self._plan(list(o), initial_job_idx + i) for i, o in enumerate(job_overrides)]
        finally:
            Singleton.set_state(state)
        todo = [j for j in jobs if j.done is None and j.active is None]
        if todo:
            self._submit(todo, state)
        self._report(jobs, todo, sweep_dir)
        running = [j.job_id for j in jobs if j.job_id and j.done is None]
        if not self.wait:
            if running:
                summary = self._submit_summary(sweep_dir, running)
                print(f"summary: SLURM job {summary} writes {sweep_dir / 'summary'} when these "
                      f"jobs end; `autograd-lab summarize {sweep_dir}` shows them before that")
            print("run the same command again to resubmit what is missing or failed", flush=True)
            # nothing ends here: no end-of-sweep callbacks (the summary job is the end)
            raise SystemExit(0)
        self._wait(running)
        return [self._job_return(j) for j in jobs]

    # -- planning: where each job writes, and whether it needs submitting
    def _plan(self, overrides: list[str], idx: int) -> _Job:
        import copy

        from hydra.core.hydra_config import HydraConfig
        from omegaconf import OmegaConf, open_dict, read_write


        sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
        with open_dict(sweep_config.hydra.job):
            sweep_config.hydra.job.num = idx
        HydraConfig.instance().set_config(sweep_config)  # as run_job does, for ${hydra:...}
        run_dir = Path(str(sweep_config.hydra.sweep.dir)) / str(
            OmegaConf.select(sweep_config, "hydra.sweep.subdir"))
        task_cfg = copy.deepcopy(sweep_config)
        with read_write(task_cfg), open_dict(task_cfg):
            del task_cfg["hydra"]
        config = OmegaConf.to_container(task_cfg, resolve=True)
        done = finished_record(run_dir, config) if config.get("resume", True) else None
        active = None
        if done is None:
            job_id = read_marker(run_dir).get("job_id")
            if job_id:
                try:
                    state = squeue_states([job_id]).get(str(job_id))
                except (OSError, subprocess.SubprocessError) as e:
                    raise _no_slurm("squeue", e) from None
                active = (str(job_id), state) if state else None
        return _Job(overrides, idx, run_dir, sweep_config, task_cfg, done, active)

    def _executor(self, folder: str):
        import submitit
        from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
        from omegaconf import OmegaConf

        params = dict(self.params)
        executor = submitit.AutoExecutor(
            cluster="slurm", folder=folder,
            slurm_max_num_timeout=params.pop("max_num_timeout", 0))
        params.pop("submitit_folder", None)
        base = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(**{k if k in base else f"slurm_{k}": v
                                      for k, v in params.items()})
        return executor

    def _submit(self, todo: list[_Job], state) -> None:
        from omegaconf import OmegaConf

        executor = self._executor(self.params["submitit_folder"])
        args = [(j.overrides, "hydra.sweep.dir", j.idx, f"job_id_for_{j.idx}", state)
                for j in todo]
        try:
            submitted = executor.map_array(self, *zip(*args, strict=True))
        except Exception as e:  # submitit's FailedJobError: sbatch refused, or no SLURM here
            raise _no_slurm("sbatch", e) from None
        now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        for job, sub in zip(todo, submitted, strict=True):
            job.job_id = str(sub.job_id)
            paths = sub.paths
            marker = {"job_id": job.job_id, "submitted": now, "stdout": str(paths.stdout),
                      "stderr": str(paths.stderr), "requeues": 0,
                      "overrides": OmegaConf.to_container(OmegaConf.create(job.overrides))}
            write_json(job.run_dir / MARKER, marker)

    def _report(self, jobs: list[_Job], todo: list[_Job], sweep_dir: Path) -> None:
        for j in jobs:
            name = j.run_dir.name
            if j.done is not None:
                print(f"skip {name}: completed")
            elif j in todo:
                print(f"submitted {name}: SLURM job {j.job_id}")
            else:
                print(f"left alone {name}: SLURM job {j.active[0]} is {j.active[1].lower()}")
        print(f"sweep: {sweep_dir} (job logs in {self.params['submitit_folder']})", flush=True)

    def _submit_summary(self, sweep_dir: Path, job_ids: list[str]) -> str:
        """A one-CPU SLURM job that writes the summary once every job has ended (afterany).
        It replaces the summary job of an earlier submission that has not started yet (one
        that has started is waited for: one writer for a summary folder)."""
        folder = Path(self.params["submitit_folder"])
        earlier = _read_text(folder / "summary_job")
        if earlier:
            state = squeue_states([earlier]).get(earlier)
            if state == "PENDING":
                subprocess.run(["scancel", earlier], capture_output=True, timeout=60)
            elif state:
                job_ids = [*job_ids, earlier]
        executor = self._executor(str(folder))
        keep = ("partition", "qos", "account", "comment", "constraint", "exclude", "setup")
        extra = dict(self.params.get("additional_parameters") or {})
        extra["dependency"] = "afterany:" + ":".join(job_ids)
        executor.update_parameters(
            timeout_min=30, cpus_per_task=1, tasks_per_node=1, nodes=1, gpus_per_node=None,
            mem_gb=None, name=f"{self.params.get('name') or 'train'}_summary",
            slurm_gres=None, slurm_gpus_per_task=None, slurm_cpus_per_gpu=None,
            slurm_mem_per_gpu=None, slurm_array_parallelism=1,
            slurm_additional_parameters=extra,
            **{f"slurm_{k}": self.params.get(k) for k in keep})
        try:
            job_id = str(executor.submit(summary_command(sweep_dir)).job_id)
        except Exception as e:  # submitit's FailedJobError: sbatch refused the summary job
            raise _no_slurm("sbatch (the summary job)", e) from None
        (folder / "summary_job").write_text(job_id + "\n")
        return job_id

    # -- waiting
    def _wait(self, job_ids: list[str]) -> None:
        delay, shown, failures = 0.5, None, 0
        try:
            while True:
                try:
                    states = squeue_states(job_ids)
                    failures = 0
                except (OSError, subprocess.SubprocessError) as e:
                    failures += 1  # slurmctld busy or restarting: ask again, for a while
                    if failures > 10:
                        raise _no_slurm("squeue", e) from None
                    time.sleep(delay)
                    continue
                if not states:
                    return
                counts = {}
                for s in states.values():
                    counts[s.lower()] = counts.get(s.lower(), 0) + 1
                text = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
                if text != shown:
                    print(f"slurm: {text}", file=sys.stderr, flush=True)
                    shown = text
                time.sleep(delay)
                delay = min(delay * 1.25, 5.0)  # quick for short jobs, gentle on slurmctld
        except KeyboardInterrupt:
            print("autograd-lab: stopped waiting; the jobs go on in SLURM. Run the same command "
                  "again to wait for them (completed jobs are skipped)", file=sys.stderr)
            raise

    def _job_return(self, job: _Job):
        from hydra.core.utils import JobReturn, JobStatus


        record = job.done if job.done is not None else read_run_json(job.run_dir)[0]
        return JobReturn(overrides=job.overrides, cfg=job.task_cfg, hydra_cfg=job.sweep_config,
                         working_dir=str(job.run_dir), task_name=str(job.sweep_config.hydra.job
                                                                      .name),
                         status=JobStatus.COMPLETED, _return_value=record)


def _no_slurm(command: str, error: Exception):

    reason = (str(error).strip().splitlines() or [type(error).__name__])[-1]
    return UserError(f"hydra/launcher=slurm: {command} failed: {reason}. Is a SLURM cluster "
                     f"reachable from here? A local one: scripts/slurm_local.sh start DIR, then "
                     f"export SLURM_CONF=DIR/etc/slurm.conf")


def summary_command(sweep_dir: Path):
    """What the summary job runs (wait=false): `autograd-lab summarize SWEEP_DIR` with this
    Python, the command a user would type. A command, not this package's summary function
    pickled: that function's module imports pandas, and this module is imported by every Hydra
    start (the plugin scan). Its output goes to the job's log; a failure fails the job."""
    import submitit

    code = "import sys; from autograd_lab.cli import main; sys.exit(main(sys.argv[1:]))"
    return submitit.helpers.CommandFunction(
        [sys.executable, "-c", code, "summarize", str(sweep_dir)])
