"""Facts about config keys, in one place: which keys change no result (left out of run names,
skip/continue comparisons and HParams), run directory names from overrides, flat dotted views
of a config, and the Hydra resolvers the configs use. Torch-free."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from autograd_lab.errors import UserError

# The top-level conf/ folder, installed as the package autograd_lab.conf (pyproject.toml): found
# through the import system, so editable installs, wheels and any working directory agree.
CONF_DIR = Path(importlib.util.find_spec("autograd_lab.conf").origin).parent

CONF_PACKAGE = "pkg://autograd_lab.conf"

# The config keys that do not change a run's results: left out of run directory names (Hydra's
# override_dirname), of the comparison that decides whether a run can be skipped or continued,
# and of HParams. The one list; a key here matches itself and the keys under it.
NON_RESULT_KEYS = ("resume", "ckpt_path", "threads", "data.root", "data.download",
                   "trainer.progress_bar", "log.flush_every_s", "log.progress_every_s",
                   "checkpoint.every_n_steps")

# The config groups whose choice names a run: HParams columns (job/board.py, even when nobody
# typed them) and the keys a summary may group by (sweep/runs.py, where it varies). The one list.
GROUPS = ("model", "data", "optim", "variant", "experiment", "size", "probes", "profiler",
          "scheduler", "trainer")

# What the module self.log()s (callback_metrics): what callbacks like EarlyStopping may monitor.
LOGGED_METRICS = ("val/loss", "val/acc")


def settable_keys(node) -> list[str]:
    """A config node's keys a user sets, sorted: Hydra's own (`_target_`, `_partial_`, ...)
    left out of the lists an error line shows."""
    return sorted(str(k) for k in node.keys() if not (str(k).startswith("_")
                                                      and str(k).endswith("_")))


def is_result_key(dotted: str) -> bool:
    return not any(dotted == k or dotted.startswith(k + ".") for k in NON_RESULT_KEYS)


def comparable(config: dict) -> dict:
    """The resolved config as flat dotted keys, without the keys that do not change results."""
    return {k: v for k, v in flatten(config).items() if is_result_key(k)}


def identity_key(config) -> str:
    """A run's identity as one string: its result-relevant config (`comparable`, resolved) as
    canonical JSON, a whole float written as an int (1.0 and 1 are one value). Two jobs of a
    sweep, or a job and a run directory, with the same key are the same run."""
    import json

    def canonical(v):
        if isinstance(v, float) and v.is_integer():
            return int(v)
        return [canonical(x) for x in v] if isinstance(v, (list, tuple)) else v

    flat = comparable(resolved(config))
    return json.dumps({k: canonical(v) for k, v in flat.items()}, sort_keys=True, default=str)


# The config keys that may differ when a run continues from a checkpoint: the non-result keys,
# plus outputs that change no curve (loggers, Lightning's LR monitor, ModelCheckpoint files).
# Unlike NON_RESULT_KEYS the added ones still name run directories and still decide whether a
# completed run is skipped; run.resumable.check_resumable reads this list, and only it.
RESUME_FREE_KEYS = (*NON_RESULT_KEYS, "logger", "callbacks.lr_monitor",
                    "callbacks.model_checkpoint")


def resume_comparable(config: dict) -> dict:
    """The resolved config as flat dotted keys, without the keys a resumed run may change."""
    return {k: v for k, v in flatten(config).items()
            if not any(k == f or k.startswith(f + ".") for f in RESUME_FREE_KEYS)}


NAME_MAX = 255  # bytes in one path component on Linux file systems


def path_safe(overrides, limit: int = NAME_MAX) -> str:
    """A run or job directory name from the overrides: readable, one path component, and short
    enough for any file system. A path value must not nest folders ("/" -> "%2F"); with no
    overrides the name is "defaults" (`autograd-lab train` always lands in runs/defaults). A
    name over `limit` bytes (NAME_MAX) keeps its first limit - 55 bytes and a hash of the whole, so
    the same command still finds the same directory; run.json and .hydra/ keep the full
    overrides."""
    import hashlib
    import re

    name = str(overrides).replace("/", "%2F").replace("\0", "") or "defaults"
    # a swept boolean comes back from Hydra's sweeper as True/False: named as typed, true/false
    name = re.sub(r"=(True|False)(?=,|$)", lambda m: "=" + m.group(1).lower(), name)
    raw = name.encode()
    if len(raw) <= limit:
        return name
    digest = hashlib.sha1(raw).hexdigest()[:12]
    head = raw[:limit - 55].decode(errors="ignore")  # never cut a character in half
    return f"{head}...{digest}"


def _register_resolvers() -> None:
    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver("path_safe", path_safe, replace=True)
    # a sweep job's folder (conf/train.yaml hydra.sweep.subdir): here its name from the
    # overrides; the running app (sweep/callbacks.py) replaces it with the folder of the sweep
    # that already holds the same run, if one does
    OmegaConf.register_new_resolver(
        "autograd_lab_job_dir", lambda name, _root_: path_safe(name), replace=True)
    OmegaConf.register_new_resolver(
        "autograd_lab_non_result_keys", lambda: list(NON_RESULT_KEYS), replace=True)


def is_num(v) -> bool:
    """A finite number (inf and nan pass YAML but no optimizer or schedule means them)."""
    import math

    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def flatten(d: dict, leaf=lambda v: v, prefix: str = "") -> dict:
    """Nested dicts -> {"a.b.c": leaf(value)}: the dotted keys users type."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, leaf, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = leaf(v)
    return out


def get_dotted(cfg, dotted: str):
    node = cfg
    for part in dotted.split("."):
        if not hasattr(node, "keys") or part not in node:
            return MISSING
        node = node[part]
    return node


MISSING = object()


def resolved(cfg) -> dict:
    """The config as plain Python values, every ${...} resolved (checks read a dict quickly);
    an interpolation that cannot be resolved is one line naming its key."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(cfg, dict):
        return cfg
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as e:
        raise _unresolvable(cfg, e) from None


def _unresolvable(cfg, e) -> UserError:
    """One line for an OmegaConf resolution error `e` in `cfg`: the key, as typed, and why."""
    import re

    from omegaconf import OmegaConf

    key = getattr(e, "full_key", None) or "the config"
    raw = get_dotted(OmegaConf.to_container(cfg, resolve=False), key)
    shown = f"{key}={raw}" if raw is not MISSING else key
    reason = str(getattr(e, "msg", None) or e).strip()
    reason = reason.splitlines()[0].strip() if reason else type(e).__name__
    # a resolver's own error (oc.env: KeyError) without OmegaConf's wrapping words
    reason = re.sub(r"^\w+ raised while resolving interpolation: ", "", reason).strip("\"'")
    return UserError(f"{shown}: cannot be resolved ({reason}); give a value, or ${{key}} "
                     f"naming a key the config has (${{oc.env:NAME,default}} for an "
                     f"environment variable that may be unset)")


def show_value(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return repr(value) if isinstance(value, str) else str(value)


_register_resolvers()
