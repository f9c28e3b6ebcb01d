"""Multirun glue: the end-of-sweep summary (a Hydra callback) and skipping finished jobs.

Also the checks that say whether a run directory's outputs parse (`read_run_json`,
`metrics_problem`): a run counts as completed only if they do. Cheap on purpose (no torch, no
pandas): the metrics file is checked by its Parquet footer (schema and row count), not read.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from hydra.experimental.callback import Callback

METRICS_COLUMNS = ("step", "epoch", "name", "value")


def json_kind(value) -> str:
    """What a JSON value is, in words."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "list"
    return type(value).__name__


def read_run_json(run_dir: Path) -> tuple[dict | None, str | None]:
    """RUN_DIR/run.json as a dict: (record, None); (None, what is wrong, in plain words) when it
    does not parse or is not a JSON object; (None, None) when there is no run.json."""
    path = Path(run_dir) / "run.json"
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None, None
    except OSError as e:
        return None, f"run.json cannot be read ({e.strerror or type(e).__name__})"
    try:
        record = json.loads(data)
    except (ValueError, RecursionError):  # not JSON, cut short, binary, not UTF-8, too deep
        what = "it is empty" if not data.strip() else "truncated or not JSON"
        return None, f"run.json does not parse ({what})"
    if not isinstance(record, dict):
        return None, (f"run.json is not a run record (it holds a JSON {json_kind(record)}, not an "
                      f"object)")
    return record, None


def metrics_problem(run_dir: Path, required: bool = True, steps=None) -> str | None:
    """What is wrong with RUN_DIR/metrics.parquet, in plain words, or None if it parses (its
    footer: schema and row count) and has the columns step, epoch, name, value. A missing file
    is a problem only if `required`; `steps` (run.json's final.steps, the train/loss rows) is the
    least number of rows it must hold."""
    path = Path(run_dir) / "metrics.parquet"
    if not path.exists() and not path.is_symlink():
        return "metrics.parquet is missing" if required else None
    import pyarrow.parquet as pq

    try:
        meta = pq.read_metadata(path)
        names = meta.schema.names
        rows = meta.num_rows
    except Exception as e:  # pyarrow's ArrowInvalid, OSError, a folder of that name, ...
        reason = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
        return f"metrics.parquet does not parse (truncated?): {reason}"
    missing = [c for c in METRICS_COLUMNS if c not in names]
    if missing:
        return f"metrics.parquet lacks the column{'s' * (len(missing) > 1)} {', '.join(missing)}"
    if isinstance(steps, int) and not isinstance(steps, bool) and rows < steps:
        return (f"metrics.parquet holds {rows} rows, fewer than the {steps} steps run.json "
                f"records (replaced or cut short?)")
    return None


def check_run_dir(run_dir: Path) -> None:
    """Refuse to write into a run directory that a newer autograd-lab wrote: its files would be
    overwritten by an older shape."""
    from . import RUN_FORMAT_VERSION
    from .config import UserError

    record, _ = read_run_json(run_dir)
    if record is None:  # none, or broken: the run writes a new one
        return
    version = record.get("format_version", 0)
    if isinstance(version, int) and version > RUN_FORMAT_VERSION:
        raise UserError(f"{run_dir} was written by a newer autograd-lab (format_version="
                        f"{version}; this one writes {RUN_FORMAT_VERSION}): upgrade, or use "
                        f"another run directory")


def finished_record(run_dir: Path, config: dict) -> dict | None:
    """The run.json of a job that already completed with exactly this resolved config and whose
    outputs parse (run.json, and metrics.parquet with every step); None: run it (again)."""
    from .config import comparable

    record, _ = read_run_json(run_dir)
    if record is None or record.get("status") != "completed":
        return None
    saved = record.get("config")
    if not isinstance(saved, dict) or comparable(saved) != comparable(config):
        return None
    final = record.get("final")
    steps = final.get("steps") if isinstance(final, dict) else None
    if metrics_problem(run_dir, required=True, steps=steps) is not None:
        return None
    return record


class SummaryCallback(Callback):
    """When a multirun ends: write summary/, say where things are, list runs that failed, were
    killed or whose files do not parse (broken), and exit non-zero if any did (a diverged run is
    a result, not a failure). A summary that cannot be written is an error: one line, exit 1."""

    def on_multirun_end(self, config, **kwargs) -> None:
        from .config import error_text
        from .summary import summarize_runs

        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            out, runs = summarize_runs(sweep_dir)
        except Exception as e:  # UserError (unwritable, a newer run inside), or a bug
            reason = error_text(e)
            reason = reason.strip().splitlines()[0] if reason.strip() else type(e).__name__
            print(f"autograd-lab: error: no summary written for {sweep_dir}: {reason}",
                  file=sys.stderr)
            sys.exit(1)
        from .messages import sweep_table, tensorboard_hint

        print(f"\n{sweep_table(runs, runs.attrs.get('swept', []))}")
        print(f"\nsummary: {out / 'summary.md'} (runs.csv, runs.parquet, curves.parquet, "
              f"{', '.join(p.name for p in sorted(out.glob('*.png')))})")
        print(f"tensorboard: {tensorboard_hint(sweep_dir)}")
        bad = runs[runs.status.isin(["failed", "interrupted", "broken"])]
        for _, row in bad.iterrows():
            print(f"{row.status}: {row.run}: {row.error}", file=sys.stderr)
        if len(bad):
            sys.exit(1)
