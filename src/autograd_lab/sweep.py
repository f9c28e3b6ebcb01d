"""Multirun glue: the end-of-sweep summary (a Hydra callback) and skipping finished jobs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from hydra.experimental.callback import Callback


def check_run_dir(run_dir: Path) -> None:
    """Refuse to write into a run directory that a newer autograd-lab wrote: its files would be
    overwritten by an older shape."""
    from . import RUN_FORMAT_VERSION
    from .config import UserError

    try:
        version = json.loads((Path(run_dir) / "run.json").read_text()).get("format_version", 0)
    except (OSError, ValueError, AttributeError):
        return
    if isinstance(version, int) and version > RUN_FORMAT_VERSION:
        raise UserError(f"{run_dir} was written by a newer autograd-lab (format_version="
                        f"{version}; this one writes {RUN_FORMAT_VERSION}): upgrade, or use "
                        f"another run directory")


def finished_record(run_dir: Path, config: dict) -> dict | None:
    """The run.json of a job that already completed with exactly this resolved config."""
    from .config import comparable

    try:
        record = json.loads((Path(run_dir) / "run.json").read_text())
    except (OSError, ValueError):
        return None
    if record.get("status") == "completed" and \
            comparable(record.get("config") or {}) == comparable(config):
        return record
    return None


class SummaryCallback(Callback):
    """When a multirun ends: write summary/, say where things are, list runs that failed, and
    exit non-zero if any did (a diverged run is a result, not a failure)."""

    def on_multirun_end(self, config, **kwargs) -> None:
        from .config import UserError
        from .summary import load_runs, summarize

        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            out = summarize(sweep_dir)
            runs = load_runs(sweep_dir)
        except UserError as e:
            print(f"autograd-lab: no summary: {e}", file=sys.stderr)
            return
        print(f"\nsummary: {out / 'summary.md'} (runs.csv, runs.parquet, curves.parquet, "
              f"{', '.join(p.name for p in sorted(out.glob('*.png')))})")
        print(f"tensorboard: tensorboard --logdir {sweep_dir}")
        bad = runs[runs.status.isin(["failed", "interrupted"])]
        for _, row in bad.iterrows():
            print(f"{row.status}: {row.run}: {row.error}", file=sys.stderr)
        if len(bad):
            sys.exit(1)
