"""The format numbers of what a run writes, and the checkpoint's place in a run directory."""

from __future__ import annotations

from pathlib import Path

CHECKPOINT_FORMAT = 2  # 1: the chunked harness (state in the Checkpointer callback's dict)


RUN_FORMAT_VERSION = 1  # bumped when run.json / metrics.parquet change shape


def newer_format(record: dict) -> int | None:
    """The format_version of a run record a newer autograd-lab wrote (this one must not rewrite
    or summarise it), else None."""
    version = record.get("format_version", 0)
    newer = isinstance(version, int) and not isinstance(version, bool)
    return version if newer and version > RUN_FORMAT_VERSION else None


CHECKPOINT = Path("checkpoints") / "last.ckpt"
