"""What a run and a sweep say: a few lines at the start and the end of each run, plain progress
lines when no terminal is watching, and the end-of-sweep table.

Everything goes through the `autograd_lab` logger. Under the CLI, Hydra's job logging
(conf/hydra/job_logging/autograd_lab.yaml) sends it to stderr and to the run's own log file
(`train.log` in the run directory); called from Python it stays silent unless the caller
configures logging (a notebook gets no stderr lines).
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

from autograd_lab.text import command_path, duration, number

log = logging.getLogger("autograd_lab")


def _in_sweep() -> bool:
    from hydra.core.hydra_config import HydraConfig

    try:
        return HydraConfig.get().mode.name == "MULTIRUN"
    except ValueError:  # not under Hydra (called from Python)
        return False


def shown(path: Path) -> str:
    """A path as a user would type it: relative to the current folder when it is inside it."""
    path = Path(path)
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve())) or "."
    except ValueError:
        return str(path)


def tensorboard_hint(run_dir: Path) -> str:
    """The command that shows `run_dir` in TensorBoard, pasteable as is into a shell (the path
    quoted where it has spaces, quotes or non-ASCII characters)."""
    import shlex


    return f"{command_path()} tensorboard {shlex.quote(shown(run_dir))}"


def starting(run_dir: Path, resumed: dict | None) -> None:
    if resumed:
        log.info(f"autograd-lab: {shown(run_dir)}: resuming from step {resumed['from_step']} "
                 f"(epoch {resumed['epoch']}, {shown(resumed['checkpoint'])})")
    else:
        log.info(f"autograd-lab: {shown(run_dir)}: starting")


def machine_load(threads: int = 2, window_s: float = 0.2) -> dict:
    """How busy the other processes keep the machine at a run's start: `busy_cores`, the cores
    in use over `window_s` seconds while this process sleeps (from /proc/stat, so this process's
    own earlier work, e.g. the previous job of a sweep, does not count, as it would in the load
    average), and the 1-minute load average for the record. Measured only where it can matter
    (2 threads or more). The environment variable AUTOGRAD_LAB_LOADAVG replaces busy_cores, for
    tests."""
    import os

    cores = os.cpu_count() or 1
    try:
        loadavg = os.getloadavg()[0]
    except OSError:  # no load average on this platform
        loadavg = None
    faked = os.environ.get("AUTOGRAD_LAB_LOADAVG")
    busy = None
    if faked:
        try:
            busy = float(faked)
        except ValueError:
            busy = None
    elif threads >= 2:
        busy = _busy_cores(window_s, cores)
    return {"busy_cores": busy, "loadavg_1min": loadavg, "cores": cores}


def _busy_cores(window_s: float, cores: int) -> float | None:
    """Cores kept busy by every process over `window_s` seconds (this one sleeps meanwhile):
    the share of non-idle time in /proc/stat's `cpu` line, times the cores; None off Linux."""

    def sample():
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        return sum(values), values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait

    try:
        total0, idle0 = sample()
        time.sleep(window_s)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    if total1 <= total0:
        return None
    return cores * (1.0 - (idle1 - idle0) / (total1 - total0))


def busy_note(load: float | None, cores: int, threads: int) -> str | None:
    """What a machine whose other processes (`load`: busy cores) leave fewer free cores than the
    run's torch threads costs, or
    None. Each intra-op parallel region waits for its slowest thread, so one busy core stalls
    every step (measured: SmallNet, 2 threads on 2 cores: 2x slower with one core busy, 50x
    with both; threads=1 is not slowed that way)."""
    if load is None or threads < 2:
        return None
    free = max(cores - load, 0.0)
    if round(free, 1) >= threads:  # as printed: never "2.0 free for 2 threads" called busy
        return None
    return (f"autograd-lab: note: this machine is busy (other processes use {load:.1f} of "
            f"{cores} cores: "
            f"{free:.1f} free for {threads} torch threads): every step waits for its slowest "
            f"thread, so steps can take 2 to 50 times longer and timings measure the load, "
            f"not the code; threads=1 avoids it (the thread count changes the last bits of "
            f"the curve)")


def busy_machine(threads: int) -> dict:
    """Say once, at a run's start, when the machine is too busy for its threads (busy_note);
    the load figures for run.json."""
    load = {**machine_load(threads), "threads": threads}
    note = busy_note(load["busy_cores"], load["cores"], threads)
    load["busy"] = note is not None
    if note:
        log.warning(note)
    return load


def skipped_line(run_dir: Path) -> str:
    return (f"autograd-lab: {shown(run_dir)}: skipped, already completed with this config "
            f"(resume=false runs it again)")


def skipped(run_dir: Path) -> None:
    log.info(skipped_line(run_dir))


def ended(record: dict, run_dir: Path) -> None:
    """The end of a run in a few lines: status, steps, losses, speed, time, where it is."""
    status = record.get("status")
    final = record.get("final") or {}
    steps = final.get("steps")
    where = shown(run_dir)
    if status == "interrupted":  # the record's error says the signal, the step and the save
        error = str(record.get("error") or "interrupted")
        if "checkpoint" in error:
            log.warning(f"autograd-lab: {where}: {error}")
        elif steps is None:  # before training started: nothing to continue from
            log.warning(f"autograd-lab: {where}: {error}; the same command starts it again")
        else:
            log.warning(f"autograd-lab: {where}: {error} at step {steps}; the same command "
                        f"continues from the last checkpoint")
        return
    if status == "failed":  # a sweep names the job; a single run says it as any error
        log.error(f"autograd-lab: {where}: failed: {record.get('error')}" if _in_sweep()
                  else f"autograd-lab: error: {record.get('error')}")
        return
    losses = (f"train loss {number(final.get('train_loss'))} (best "
              f"{number(final.get('best_train_loss'))}), {val_text(final)}")
    took = f"{steps:,} steps in {duration(record.get('wall_seconds') or 0.0)}"
    if _in_sweep():  # one line a job: the sweep's end says where TensorBoard is
        log.info(f"autograd-lab: {where}: {status}, {took}, {losses}"
                 + (f" ({record.get('error')})" if status == "diverged" else ""))
        return
    lines = [f"autograd-lab: {where}: {status}, {took}"
             + (f" ({number(record.get('images_per_s'))} images/s, "
                f"{number(1000 * record['seconds_per_step'])} ms/step)"
                if record.get("seconds_per_step") else "")]
    if status == "diverged":
        lines.append(f"  {record.get('error')}: the curve is kept up to step {steps - 1}")
    lines += [f"  {losses}", f"  tensorboard: {tensorboard_hint(run_dir)}"]
    log.info("\n".join(lines))


def val_text(final: dict) -> str:
    """`val loss 2.29, val acc 0.133`, with the step it was measured at when that is not the
    run's last (`val loss 2.32 at step 40, val acc 0.108`): a quoted validation says its step."""
    at = final.get("val_step")
    when = f" at step {at:,}" if at is not None and at != final.get("steps") else ""
    return f"val loss {number(final.get('val_loss'))}{when}, val acc {number(final.get('val_acc'))}"


def sweep_table(runs, by: list[str]) -> str:
    """One row per run of a finished sweep: its swept keys, status, losses, accuracy, time."""
    rows = []
    for _, r in runs.sort_values("run").iterrows():
        rows.append({"run": r.run, "status": r.status,
                     "train loss": number(r.get("train_loss")), "val loss": _val_at(r),
                     "val acc": number(r.get("val_acc")),
                     "time": duration(r["wall_seconds"]) if _finite(r.get("wall_seconds"))
                     else "-"})
    import pandas as pd

    return pd.DataFrame(rows).to_string(index=False)


def _val_at(r) -> str:
    """The sweep table's val loss, with its step when it is not the run's last (`2.32 @40`)."""
    at, steps = r.get("val_step"), r.get("steps")
    if _finite(r.get("val_loss")) and _finite(at) and _finite(steps) and int(at) != int(steps):
        return f"{number(r.get('val_loss'))} @{int(at):,}"
    return number(r.get("val_loss"))


def _finite(x) -> bool:
    try:
        return x is not None and math.isfinite(float(x))
    except (TypeError, ValueError):
        return False
