"""The harness's own files, written atomically: a temporary file in the same folder, fsync,
rename. A kill at any moment leaves the old file or the new one. No torch here: `summarize`
writes its tables without importing it (records re-exports these for the run's writers)."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over `path`. A failed
    write (a full disk) leaves the old file as it was and raises OSError naming `path`.

    Only a plain file (or nothing) at `path` is replaced. A symlink, FIFO, device or folder
    there is refused (lock.ForeignEntry, one line naming it) and left as it is: the rename
    would never write through a symlink, but it would silently replace an entry the harness did
    not make. Checked before the temporary file is written and again just before the rename."""
    from .lock import foreign

    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if (refused := foreign(path)) is not None:
            raise refused
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if (refused := foreign(path)) is not None:
            raise refused
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and e.filename is None:
            raise OSError(e.errno, e.strerror, str(path)) from None
        raise


def _finite(obj):
    """NaN/inf -> null: run.json stays strict JSON that any reader accepts."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_json(path: Path, obj) -> None:
    text = json.dumps(_finite(obj), indent=2, default=str, allow_nan=False)
    atomic_write_bytes(path, (text + "\n").encode())


def write_parquet(path: Path, frame) -> None:
    import io

    buf = io.BytesIO()
    frame.to_parquet(buf, index=False)
    atomic_write_bytes(path, buf.getvalue())


def write_csv(path: Path, frame) -> None:
    atomic_write_bytes(path, frame.to_csv(index=False).encode())
