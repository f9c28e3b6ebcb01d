"""SLURM through Hydra's submitit launcher (`hydra/launcher=slurm`), run for real.

Two sides. The submitting side is `SlurmLauncher` (Hydra's submitit SLURM launcher, extended):
before it submits it looks at each job's run directory and skips a job that completed with the
same config, leaves alone one that SLURM is still running, and submits the rest as one array; it
then waits for the jobs by `squeue` (no accounting database needed, unlike submitit's own waiting,
which reads `sacct`), or, with `wait=false`, returns at once and leaves the summary to a SLURM job
that starts when the jobs end. Each job's directory gets `slurm.json` (its SLURM job id, log
files, requeues), which is how `slurm_job_state(run_dir)` finds it again.

The job side is `SlurmJob`, used by `train.main` in a SLURM job: torch threads = the job's CPUs
per task; its ids go into run.json; and after a stop signal (the run saved at a step boundary and
recorded `interrupted`) it requeues the job when the signal only asked the run to stop: SIGUSR2
(submitit's preemption signal, sent `signal_delay_s` before the time limit), SIGUSR1 or SIGTERM
while SLURM still has the job RUNNING (`scancel --signal=...`), up to `max_requeues` times. When
SLURM itself preempts or requeues a job (the job is no longer RUNNING when the signal arrives)
SLURM requeues it; a cancelled or timed-out job is left stopped. A job that fails for a real error
is never requeued: its run.json says `failed`, whatever SLURM's state says. The requeued job
runs the same pickled call again, and the run continues from its checkpoint to the same curve.

Hydra takes launcher classes only from its `hydra_plugins` namespace: the package installs
hydra_plugins.autograd_lab_slurm_launcher (src/hydra_plugins/), which Hydra's plugin scan finds
(in an editable install, which the scan cannot see, slurm.yaml's callback registers it), and
conf/hydra/launcher/slurm.yaml names that class.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from autograd_lab.disk.files import write_json
from autograd_lab.disk.lock import open_own

MARKER = "slurm.json"  # in each job's run directory

DEFAULT_MAX_REQUEUES = 3

# signals that ask a run to stop without ending the job: a requeue continues it
REQUEUE_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)


# ------------------------------------------------------------------ SLURM's view of jobs
def squeue_states(job_ids) -> dict[str, str]:
    """{job id: SLURM state} for the jobs SLURM still has pending, running or completing (ids
    like `12` or array tasks `12_3`); a job that is not listed has ended. Raises OSError when
    squeue is missing or slurmctld does not answer."""
    ids = sorted({str(j) for j in job_ids if j})
    if not ids:
        return {}
    out = subprocess.run(["squeue", "-h", "-r", "-o", "%i|%T", "-j", ",".join(ids)],
                         capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        if "Invalid job id" in out.stderr:  # none of them is known any more: all ended
            return {}
        raise OSError(f"squeue: {out.stderr.strip() or f'exit {out.returncode}'}")
    states = {}
    for line in out.stdout.splitlines():
        job, _, state = line.strip().partition("|")
        states[job] = state
    wanted = set(ids)
    # an array job asked for by its array id lists its tasks (12_0, 12_1, ...)
    return {j: s for j, s in states.items() if j in wanted or j.split("_")[0] in wanted}


def read_marker(run_dir: Path) -> dict:

    try:
        with os.fdopen(open_own(Path(run_dir) / MARKER), "rb") as f:
            data = json.loads(f.read())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _read_text(path: Path) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return ""


def slurm_job_state(run_dir) -> str | None:
    """The SLURM state of the job that runs (or will run) RUN_DIR, lower case (`pending`,
    `running`, `completing`, ...), while SLURM has it; None when it has ended, when the run was
    not submitted to SLURM, or when SLURM cannot be asked here. For summaries of a sweep whose
    jobs are still running."""
    return slurm_job_states([run_dir]).get(Path(run_dir))


def slurm_job_states(run_dirs) -> dict[Path, str]:
    """slurm_job_state for many run directories with one squeue call: {run dir: state} for
    those SLURM still has. No squeue call at all when none was submitted to SLURM."""
    ids = {Path(d): str(read_marker(d).get("job_id") or "") for d in run_dirs}
    ids = {d: j for d, j in ids.items() if j}
    try:
        states = squeue_states(ids.values())
    except (OSError, subprocess.SubprocessError):
        return {}
    return {d: states[j].lower() for d, j in ids.items() if j in states}


# ------------------------------------------------------------------ the job side
class SlurmJob:
    """This process is a job of a submitit SLURM launcher: its ids, CPUs and requeue rule."""

    def __init__(self, max_requeues: int):
        env = os.environ
        array, task = env.get("SLURM_ARRAY_JOB_ID"), env.get("SLURM_ARRAY_TASK_ID")
        self.job_id = f"{array}_{task}" if array and task else env["SLURM_JOB_ID"]
        self.cpus = int(env.get("SLURM_CPUS_PER_TASK") or 1)
        self.max_requeues = max_requeues
        self.rank = int(env.get("SLURM_PROCID") or 0)

    @classmethod
    def current(cls, hc) -> SlurmJob | None:
        """The job this process runs, or None outside a submitit SLURM job."""
        if os.environ.get("SUBMITIT_EXECUTOR") != "slurm" or "SLURM_JOB_ID" not in os.environ:
            return None
        launcher = hc.launcher if hc is not None else {}
        return cls(int(launcher.get("max_requeues", DEFAULT_MAX_REQUEUES)))

    def info(self, run_dir: Path) -> dict:
        env = os.environ
        marker = read_marker(run_dir)
        return {"job_id": self.job_id, "slurm_job_id": env["SLURM_JOB_ID"],
                "restarts": int(env.get("SLURM_RESTART_COUNT") or 0),
                "requeues": int(marker.get("requeues") or 0),
                "partition": env.get("SLURM_JOB_PARTITION"), "node": env.get("SLURMD_NODENAME"),
                "cpus_per_task": self.cpus, "stdout": marker.get("stdout"),
                "stderr": marker.get("stderr")}

    def started(self, run_dir: Path) -> None:
        """Note the job in the run directory (also for a job submitted by other means)."""
        if self.rank:
            return
        marker = read_marker(run_dir)
        marker.update(job_id=self.job_id, started=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                      restarts=int(os.environ.get("SLURM_RESTART_COUNT") or 0))
        write_json(Path(run_dir) / MARKER, marker)

    def finished(self, run_dir: Path, exit_code: int | None = None) -> dict:
        """After the run wrote its record: put the job's ids into run.json, and requeue the job
        if a signal stopped it and asked for no more than that. Returns the `slurm` section."""
        info = self.info(run_dir)
        if self.rank:
            return info
        signum = exit_code - 128 if isinstance(exit_code, int) and exit_code > 128 else None
        if signum is not None:
            info["requeue"] = self._requeue(run_dir, signum)
        record_path = Path(run_dir) / "run.json"
        try:
            record = json.loads(record_path.read_text())
        except (OSError, ValueError):
            record = None
        if isinstance(record, dict):
            record["slurm"] = info
            write_json(record_path, record)
        return info

    def _requeue(self, run_dir: Path, signum: int) -> str:
        name = signal.Signals(signum).name
        if signum not in REQUEUE_SIGNALS:
            return f"not requeued: {name} stops the job"
        try:
            state = squeue_states([self.job_id]).get(self.job_id)
        except (OSError, subprocess.SubprocessError) as e:
            return f"not requeued: SLURM did not say the job's state ({e})"
        if state != "RUNNING":  # SLURM preempts, requeues, cancels or ends it: its decision
            what = "SLURM requeues it" if state in ("COMPLETING", "PREEMPTED", "PENDING",
                                                     "REQUEUED") else "SLURM ends it"
            return f"not requeued by the harness: the job is {state or 'gone'} ({what})"
        marker = read_marker(run_dir)
        done = int(marker.get("requeues") or 0)
        if done >= self.max_requeues:
            message = (f"not requeued: max_requeues={self.max_requeues} reached; run the same "
                       f"command again to continue it")
            print(f"autograd-lab: {run_dir}: {message}", file=sys.stderr)
            return message
        marker["requeues"] = done + 1
        write_json(Path(run_dir) / MARKER, marker)  # before: the requeue ends this process
        out = subprocess.run(["scontrol", "requeue", self.job_id], capture_output=True,
                             text=True, timeout=60)
        if out.returncode != 0:
            marker["requeues"] = done
            write_json(Path(run_dir) / MARKER, marker)
            return f"not requeued: scontrol requeue: {out.stderr.strip()}"
        print(f"autograd-lab: {run_dir}: stopped by {name}, saved; SLURM job {self.job_id} "
              f"requeued ({done + 1} of {self.max_requeues}): it continues from its checkpoint",
              file=sys.stderr, flush=True)
        return f"requeued after {name} ({done + 1} of {self.max_requeues})"
