"""Text the harness prints: numbers (3 significant digits), durations, and the command that
calls this console script again, pasteable as is. A leaf: imports nothing of the package."""

from __future__ import annotations

import math
import sys
from pathlib import Path


def console_script() -> Path | None:
    """This environment's `autograd-lab` console script (beside this Python), if installed."""
    exe = Path(sys.executable).parent / "autograd-lab"
    return exe if exe.exists() else None


def command_path() -> str:
    """How to call this console script again, pasteable as is into a shell (no activated venv
    needed; quoted where the path has spaces, quotes or non-ASCII characters)."""
    import shlex

    if (exe := console_script()) is None:
        return "autograd-lab"
    try:
        return shlex.quote(str(exe.relative_to(Path.cwd())))
    except ValueError:
        return shlex.quote(str(exe))


def as_typed(value) -> str:
    """A config value as it is typed on a command line: true, not True (booleans read back from
    a frame or a run record are often the strings "True"/"False")."""
    if isinstance(value, bool) or str(value) in ("True", "False"):
        return str(value).lower()
    return str(value)


def number(x, digits: int = 3) -> str:

    return fmt_number(x, digits)


def duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, seconds = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def fmt_number(x, digits: int = 3) -> str:
    """Plain notation with `digits` significant digits (0.163, 2.19, 6,842); powers of ten
    only where the size needs them (1.1e7, 3.2e-5)."""
    try:
        x = float(x)
    except (TypeError, ValueError):  # None, pandas' NA
        return "-"
    if math.isnan(x):
        return "-"
    if math.isinf(x):  # a validation loss that overflowed, say
        return "inf" if x > 0 else "-inf"
    if x == 0:
        return "0"
    if abs(x) >= 1e6 or abs(x) < 1e-3:
        mantissa, exponent = f"{x:.{digits - 1}e}".split("e")
        return f"{float(mantissa):.{digits}g}e{int(exponent)}"
    if abs(x) >= 10 ** digits:
        return f"{x:,.0f}"
    return f"{x:.{digits}g}"
