"""The format numbers of what a run writes, and the checkpoint's place in a run directory."""

from __future__ import annotations

from pathlib import Path

CHECKPOINT_FORMAT = 2  # 1: the chunked harness (state in the Checkpointer callback's dict)


RUN_FORMAT_VERSION = 1  # bumped when run.json / metrics.parquet change shape


CHECKPOINT = Path("checkpoints") / "last.ckpt"
