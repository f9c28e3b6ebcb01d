"""The harness's own files, written atomically: a temporary file in the same folder, fsync,
rename. A kill at any moment leaves the old file or the new one. No torch here: `summarize`
writes its tables without importing it (records re-exports these for the run's writers).
Hand-written: the standard library has no atomic replace, and the package that had one
(atomicwrites) is unmaintained; here the write also refuses a symlink or FIFO in the path."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

from autograd_lab.disk.lock import foreign
from autograd_lab.errors import UserError, clip

# the atomic file writes live in files.py (torch-free, for `summarize`); the run's writers
# import them from here as before


_UMASK = os.umask(0)

os.umask(_UMASK)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over `path`. A failed
    write (a full disk) leaves the old file as it was and raises OSError naming `path`.

    Only a plain file (or nothing) at `path` is replaced. A symlink, FIFO, device or folder
    there is refused (lock.ForeignEntry, one line naming it) and left as it is: the rename
    would never write through a symlink, but it would silently replace an entry the harness did
    not make. Checked before the temporary file is written and again just before the rename."""

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


def load_tensor_file(path: Path, label: str, map_location="cpu", hint: str = "replace it"):
    """torch.load(weights_only=True) with a one-line UserError that says which of three things
    is wrong: no such file; a pickle that asks to run code (refused: torch's weights-only
    unpickler never runs it); a truncated or corrupted file. `label` names the file."""
    import pickle
    import re
    import warnings

    import torch


    try:
        with warnings.catch_warnings():  # "Detected pickle protocol 4": the error below says it
            warnings.simplefilter("ignore")
            return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{label}: no such file") from None
    except pickle.UnpicklingError as e:
        named = re.search(r"GLOBAL ([\w.]+)", str(e))  # weights_only refused a callable
        # a pickle of protocol 4 or later (pickle.dumps, never torch.save): torch's reader stops
        # at its first opcode; read its opcodes (never run them) for the callables it would call
        callables = [named.group(1)] if named else \
            pickle_callables(path) if _pickle_protocol(path) >= 4 else []
        if callables:
            raise UserError(f"{label}: not a plain tensor file (it asks to run "
                            f"{', '.join(callables[:3])}): refusing to unpickle it; nothing in "
                            f"it was run; {hint}") from None
        reason = clip(str(e), 120) or type(e).__name__
    except Exception as e:
        reason = clip(str(e), 120) or type(e).__name__
    protocol = _pickle_protocol(path)
    # torch.save's legacy format starts with a protocol-2 pickle of its magic number
    if protocol >= 4 or (protocol and "magic number" in reason):
        raise UserError(f"{label}: a plain pickle (protocol {protocol}), not a file torch.save "
                        f"wrote; {hint}")
    raise UserError(f"{label}: truncated or corrupted ({reason}); {hint}")


def _pickle_protocol(path: Path) -> int:
    """The protocol (2 or later) of the pickle `path` starts with; 0 for any other file, a zip
    archive (torch.save's format since 1.6) included."""
    import zipfile

    try:
        with open(path, "rb") as f:
            head = f.read(2)
        if len(head) == 2 and head[0] == 0x80 and not zipfile.is_zipfile(path):
            return head[1]
    except OSError:
        pass
    return 0


def pickle_callables(path: Path, most: int = 8) -> list[str]:
    """The callables (module.name) the pickles at the start of `path` would import and call when
    unpickled, read from their opcodes by pickletools without running any; [] for a file that is
    not a plain pickle. Reads at most `most` pickles in sequence (torch's legacy format is
    several)."""
    import pickletools

    if not _pickle_protocol(path):
        return []
    strings = ("STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE",
               "SHORT_BINUNICODE", "BINUNICODE8")
    found: list[str] = []
    try:
        with open(path, "rb") as f:
            for _ in range(most):
                pushed: list = []  # what each opcode pushed: STACK_GLOBAL takes two strings
                memo: dict = {}
                for op, arg, _pos in pickletools.genops(f):
                    if op.name in ("GLOBAL", "INST"):
                        found.append(str(arg).replace(" ", "."))
                    elif op.name == "STACK_GLOBAL":
                        module, name = (pushed[-2:] if len(pushed) >= 2 else [None, None])
                        found.append(f"{module}.{name}" if isinstance(module, str)
                                     and isinstance(name, str) else "a callable")
                    if op.name == "MEMOIZE":
                        memo[len(memo)] = pushed[-1] if pushed else None
                    elif op.name in ("PUT", "BINPUT", "LONG_BINPUT"):
                        memo[arg] = pushed[-1] if pushed else None
                    elif op.name in ("GET", "BINGET", "LONG_BINGET"):
                        pushed.append(memo.get(arg))
                    elif op.name in strings:
                        pushed.append(arg)
                    elif op.name not in ("PROTO", "FRAME"):
                        pushed.append(None)
                if f.peek(1)[:1] != b"\x80":  # no further pickle follows
                    break
    except Exception:  # cut short, or no pickle past this point: what was read counts
        pass
    return list(dict.fromkeys(found))
