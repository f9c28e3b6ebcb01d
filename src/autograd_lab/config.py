"""Config checks that turn a user's mistake into one line naming the bad value and the valid ones.

Hydra parses and composes the config; this module only adds what Hydra cannot know: which values
make sense. `check_overrides` runs before Hydra creates any directory (the CLI calls it), so a
typo never leaves a half-made run directory behind. `validate` runs again inside the job, so
`python -m autograd_lab.train` gets the same checks. No torch import here: it must stay fast.
"""

from __future__ import annotations

import functools
import importlib.util
import itertools
import logging
import os
from pathlib import Path

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


# What the module self.log()s (callback_metrics): what callbacks like EarlyStopping may monitor.
LOGGED_METRICS = ("val/loss", "val/acc")


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
# completed run is skipped; checkpoint.check_resumable reads this list, and only it.
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
    # overrides; the running app (sweep.py) replaces it with the folder of the sweep that already
    # holds the same run, if one does
    OmegaConf.register_new_resolver(
        "autograd_lab_job_dir", lambda name, _root_: path_safe(name), replace=True)
    OmegaConf.register_new_resolver(
        "autograd_lab_non_result_keys", lambda: list(NON_RESULT_KEYS), replace=True)


class UserError(Exception):
    """A mistake in what the user asked for. Shown as one line, never as a traceback."""


# True while `autograd-lab train` runs the Hydra app it has checked (config.check_overrides):
# the app's own preflight (sweep.PreflightCallback, for `python -m autograd_lab.train`) skips
CHECKED_BY_CLI = False


# Hydra's own nodes that it makes from a `_target_` as it starts (before any check of ours): the
# class each must subclass, and an example
HYDRA_TARGETS = {
    "hydra.callbacks": ("hydra.experimental.callback.Callback", "Hydra Callback",
                        "autograd_lab.sweep.SummaryCallback"),
    "hydra.launcher": ("hydra.plugins.launcher.Launcher", "Hydra Launcher",
                       "hydra/launcher=joblib"),
    "hydra.sweeper": ("hydra.plugins.sweeper.Sweeper", "Hydra Sweeper",
                      "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"),
}


def refuse_running_code(args: list[str]) -> None:
    """What on a command line would run code before the harness checks anything: Hydra's
    `--experimental-rerun FILE`, which unpickles FILE (refused, also abbreviated, as argparse
    would take it; the harness's resume replaces it), and a `_target_` typed for one of Hydra's
    own nodes (HYDRA_TARGETS), which must be a class of its kind."""
    flag = "--experimental-rerun"
    for a in args:
        name = a.split("=", 1)[0]
        if len(name) > 2 and name.startswith("--e") and flag.startswith(name):
            raise UserError(f"{a}: refused: it unpickles a file, which can run any code; to "
                            f"continue an interrupted run, run the same command again (resume="
                            f"true, the default, continues from its checkpoint)")
        key = name.lstrip("+~")
        node = next((n for n in HYDRA_TARGETS if key == n or key.startswith(n + ".")), None)
        if node is None or a.startswith("-") or "_target_" not in a:
            continue
        from hydra.core.override_parser.overrides_parser import OverridesParser

        try:
            value = OverridesParser.create().parse_override(a).value()
        except Exception:  # not an override Hydra parses: Hydra says so
            continue
        where = key if key.endswith("._target_") else f"{key}: _target_"
        for target in [value] if key.endswith("._target_") else _targets_in(value):
            check_class(where, target, *HYDRA_TARGETS[node])


def _targets_in(value) -> list:
    """Every `_target_` value inside a parsed override value (dicts and lists)."""
    if isinstance(value, dict):
        found = [value["_target_"]] if "_target_" in value else []
        return found + [t for k, v in value.items() if k != "_target_" for t in _targets_in(v)]
    if isinstance(value, list):
        return [t for v in value for t in _targets_in(v)]
    return []


def error_text(e: BaseException) -> str:
    """What a run record and a message say of an error: a user's mistake as its own words, a
    bug with its type."""
    return str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}"


def clip(text: str, limit: int = 160) -> str:
    """The first line of `text`, shortened to about `limit` characters at a word boundary with
    "…" (a message is never cut mid-word)."""
    line = next((ln.strip() for ln in str(text).splitlines() if ln.strip()), "")
    if len(line) <= limit:
        return line
    end = line.rfind(" ", 0, limit + 1)
    if end <= 0:  # one long word (a path): kept whole up to the next space
        end = line.find(" ", limit)
        if end == -1:
            return line
    return line[:end].rstrip(" ,;:(") + "…"


# errno values that mean "this file system will not take the write": the run stops, failed,
# with one line, and the same command continues once it will
WRITE_ERRNOS = (28, 122, 30, 5)  # ENOSPC, EDQUOT, EROFS, EIO


def write_failure(e: BaseException, folder=None) -> str | None:
    """One line for a write the file system refused, or None for any other exception. Writers
    that do not say which file (TensorBoard's) are named by the folder they write in."""
    while e is not None and not isinstance(e, OSError):
        e = e.__cause__ or e.__context__
    if e is None or e.errno not in WRITE_ERRNOS:
        return None
    where = e.filename or (f"into {folder}" if folder is not None else "")
    return f"cannot write {where}: {e.strerror}" if where else f"cannot write: {e.strerror}"


def did_you_mean(name, names) -> str:
    """The one suggestion rule for every name a user types (a config key, a group choice, a
    freeze glob, a detach point): " (did you mean X?)" or " (did you mean X or Y?)" with the
    closest of `names` by difflib's similarity (its default cutoff, 0.6), or "" when none is
    close."""
    import difflib

    close = difflib.get_close_matches(str(name), [str(n) for n in names], n=2)
    return f" (did you mean {' or '.join(close)}?)" if close else ""


def _is_num(v) -> bool:
    """A finite number (inf and nan pass YAML but no optimizer or schedule means them)."""
    import math

    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# key -> (predicate, what is valid). Keys absent from the config (e.g. model.stem for smallnet)
# are skipped, so one table serves every model and data choice.
CHECKS: dict[str, tuple] = {
    "seed": (lambda v: _is_int(v) and 0 <= v < 2**32, "an integer in [0, 2**32)"),
    "resume": (lambda v: isinstance(v, bool), "true or false"),
    "threads": (lambda v: v is None or (_is_int(v) and v >= 1), "null or an integer >= 1"),
    "model.activation": (lambda v: v in ("relu", "custom_relu"), "one of: relu, custom_relu"),
    "model.stem": (lambda v: v in ("imagenet", "cifar"), "one of: imagenet, cifar"),
    "model.weights": (lambda v: v in (None, "IMAGENET1K_V1", "DEFAULT"),
                      "one of: null, IMAGENET1K_V1, DEFAULT"),
    "model.num_classes": (lambda v: _is_int(v) and v >= 10,
                          "an integer >= 10 (CIFAR-10's labels are 0..9)"),
    "model.weights_path": (lambda v: v is None or isinstance(v, str), "null or a file path"),
    "ckpt_path": (lambda v: v is None or (isinstance(v, str) and v != ""),
                  "null or a checkpoint file path"),
    "data.root": (lambda v: isinstance(v, str) and v != "", "a directory path"),
    "data.download": (lambda v: isinstance(v, bool), "true or false"),
    "data.batch_size": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "data.val_batch_size": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "data.shuffle": (lambda v: isinstance(v, bool), "true or false"),
    "data.augment": (lambda v: v in ("none", "flip_crop"), "one of: none, flip_crop"),
    "data.subset": (lambda v: v is None or (_is_int(v) and v >= 1), "null or an integer >= 1"),
    "data.train_size": (lambda v: _is_int(v) and 5 <= v <= 10**7,
                        "an integer in [5, 10000000] (written as 5 batch files, as CIFAR-10)"),
    "data.test_size": (lambda v: _is_int(v) and 1 <= v <= 10**7, "an integer in [1, 10000000]"),
    "data.noise": (lambda v: _is_num(v) and v >= 0, "a finite number >= 0"),
    "data.synthetic_seed": (lambda v: _is_int(v) and 0 <= v < 2**32,
                            "an integer in [0, 2**32)"),
    "optim.lr": (lambda v: _is_num(v) and v > 0, "a finite number > 0"),
    "optim.momentum": (lambda v: _is_num(v) and 0 <= v < 1, "a finite number in [0, 1)"),
    "optim.weight_decay": (lambda v: _is_num(v) and v >= 0, "a finite number >= 0"),
    "optim.nesterov": (lambda v: isinstance(v, bool), "true or false"),
    "optim.betas": (lambda v: isinstance(v, (list, tuple)) and len(v) == 2
                    and all(_is_num(b) and 0 <= b < 1 for b in v), "two numbers in [0, 1)"),
    # the schedulers' arguments (conf/scheduler/*.yaml): torch checks some only at the first
    # step (StepLR divides by step_size) and none of the ranges that make a learning rate > 0;
    # any other argument's type is checked against the class's signature (check_arguments)
    "scheduler.make.step_size": (lambda v: _is_int(v) and v >= 1,
                                 "an integer >= 1 (epochs between two decays)"),
    "scheduler.make.gamma": (lambda v: _is_num(v) and v > 0,
                             "a finite number > 0 (the factor every step_size epochs)"),
    "scheduler.make.eta_min": (lambda v: _is_num(v) and v >= 0,
                               "a finite number >= 0 (the learning rate at the end)"),
    "scheduler.make.max_lr": (lambda v: _is_num(v) and v > 0, "a finite number > 0"),
    "scheduler.make.pct_start": (lambda v: _is_num(v) and 0 < v < 1,
                                 "a number in (0, 1): the fraction of the run spent warming up"),
    "train.zero_grad": (lambda v: isinstance(v, bool), "true or false"),
    "train.freeze": (lambda v: isinstance(v, str) or (isinstance(v, (list, tuple))
                     and all(isinstance(p, str) for p in v)),
                     "a list of parameter-name globs, or the preset backbone"),
    "train.freeze_bn_stats": (lambda v: isinstance(v, bool), "true or false"),
    "train.detach_at": (lambda v: v is None or isinstance(v, str), "null or a module name"),
    "eval.grad_mode": (lambda v: v in ("inference", "no_grad", "enabled"),
                       "one of: inference, no_grad, enabled"),
    "trainer.max_epochs": (lambda v: _is_int(v) and (v >= 1 or v == -1), "an integer >= 1 or -1"),
    "trainer.max_steps": (lambda v: _is_int(v) and (v >= 1 or v == -1), "an integer >= 1 or -1"),
    "trainer.accelerator": (lambda v: v in ("auto", "cpu", "gpu", "cuda", "mps"),
                            "one of: auto, cpu, gpu, cuda, mps"),
    "trainer.devices": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "trainer.strategy": (lambda v: v in ("auto", "ddp"), "auto or ddp (trainer=ddp)"),
    "trainer.deterministic": (lambda v: isinstance(v, bool), "true or false"),
    "trainer.check_val_every_n_epoch": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "trainer.limit_val_batches": (lambda v: (_is_int(v) and v >= 0)
                                  or (isinstance(v, float) and 0 <= v <= 1),
                                  "a fraction in [0, 1] or a whole number of batches"),
    "trainer.progress_bar": (lambda v: v in ("auto", True, False), "one of: auto, true, false"),
    "probes.every_n_steps": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "probes.histogram_every_n_steps": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "probes.sharpness_every_n_steps": (lambda v: _is_int(v) and v >= 0,
                                       "an integer >= 0 (0: off)"),
    "probes.gns_every_n_steps": (lambda v: _is_int(v) and v >= 0, "an integer >= 0 (0: off)"),
    "probes.sharpness_examples": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "probes.sharpness_iters": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "probes.sharpness_batch_size": (lambda v: v is None or (_is_int(v) and v >= 1),
                                    "an integer >= 1, or null (the training batch size)"),
    "probes.gns_small_batch_size": (lambda v: v is None or (_is_int(v) and v >= 1),
                                    "an integer >= 1, or null (the training batch size)"),
    "probes.gns_batch_size": (lambda v: _is_int(v) and v >= 2, "an integer >= 2"),
    "probes.gns_method": (lambda v: v in ("auto", "per_example", "two_batch"),
                          "one of auto, per_example, two_batch"),
    "profiler.wait": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "profiler.warmup": (lambda v: _is_int(v) and v >= 1, "an integer >= 1 (PyTorch recommends "
                        "warming up)"),
    "profiler.active": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "profiler.repeat": (lambda v: _is_int(v) and v >= 0, "an integer >= 0 (0: until the end)"),
    "log.flush_every_s": (lambda v: _is_num(v) and v > 0, "a finite number > 0"),
    "log.progress_every_s": (lambda v: _is_num(v) and v > 0, "a finite number > 0 (seconds)"),
    "checkpoint.every_n_steps": (lambda v: _is_int(v) and v >= 0,
                                 "an integer >= 0 (0: only on a signal and at the end)"),
}


def flatten(d: dict, leaf=lambda v: v, prefix: str = "") -> dict:
    """Nested dicts -> {"a.b.c": leaf(value)}: the dotted keys users type."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, leaf, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = leaf(v)
    return out


def _get(cfg, dotted: str):
    node = cfg
    for part in dotted.split("."):
        if not hasattr(node, "keys") or part not in node:
            return _MISSING
        node = node[part]
    return node


_MISSING = object()


def validate(cfg) -> None:
    """Raise UserError for the first value in `cfg` that is not valid (an interpolation that
    cannot be resolved included)."""
    cfg = resolved(cfg)
    _validate_keys(cfg)
    trainer = cfg.get("trainer") or {}
    if trainer.get("max_epochs") == -1 and trainer.get("max_steps", -1) == -1:
        raise UserError("trainer.max_epochs=-1: with trainer.max_steps=-1 the run never ends; "
                        "set trainer.max_steps=N, or trainer.max_epochs >= 1")
    _check_paths(cfg)
    if trainer.get("devices", 1) > 1 and trainer.get("strategy") != "ddp":
        raise UserError(f"trainer.devices={trainer.get('devices')}: more than 1 needs trainer=ddp "
                        f"(one process per device); or use trainer.devices=1")
    if trainer.get("strategy") == "ddp" and (cfg.get("profiler") or {}).get("name") == "torch":
        raise UserError("profiler=torch with trainer=ddp: profile a single-device run "
                        "(profiler=torch trainer=default); choices here: profiler=off")
    for name, node in (cfg.get("callbacks") or {}).items():
        _check_known_callback(f"callbacks.{name}", node)
        monitor = node.get("monitor") if hasattr(node, "get") else None
        if monitor is not None and monitor not in LOGGED_METRICS:
            raise UserError(f"callbacks.{name}.monitor={_show(monitor)}: no such metric"
                            f"{did_you_mean(monitor, LOGGED_METRICS)}; the run logs: "
                            f"{', '.join(LOGGED_METRICS)}")
    probes = cfg.get("probes") or {}
    model = (cfg.get("model") or {}).get("name")
    if probes.get("gns_method") == "per_example" and model == "resnet18":
        raise UserError("probes.gns_method=per_example with model=resnet18: per-example "
                        "gradients need a model without train-mode BatchNorm; use "
                        "probes.gns_method=two_batch (or auto)")
    optim = cfg.get("optim") or {}
    if optim.get("nesterov") and not optim.get("momentum"):
        raise UserError(f"optim.nesterov=true: needs optim.momentum > 0 "
                        f"(got {_show(optim.get('momentum'))})")


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
    raw = _get(OmegaConf.to_container(cfg, resolve=False), key)
    shown = f"{key}={raw}" if raw is not _MISSING else key
    reason = str(getattr(e, "msg", None) or e).strip()
    reason = reason.splitlines()[0].strip() if reason else type(e).__name__
    # a resolver's own error (oc.env: KeyError) without OmegaConf's wrapping words
    reason = re.sub(r"^\w+ raised while resolving interpolation: ", "", reason).strip("\"'")
    return UserError(f"{shown}: cannot be resolved ({reason}); give a value, or ${{key}} "
                     f"naming a key the config has (${{oc.env:NAME,default}} for an "
                     f"environment variable that may be unset)")


def _check_paths(cfg) -> None:
    """Paths the run reads must be folders (or files) that resolve: a file where a folder
    goes, or a symlink loop, is one line here instead of a traceback deep in a library."""
    for key, kind in (("data.root", "folder"), ("model.weights_path", "file"),
                      ("ckpt_path", "file")):
        value = _get(cfg, key)
        if value is _MISSING or not isinstance(value, str) or not value:
            continue
        path = Path(value).expanduser()
        try:
            path.resolve(strict=False)
        except (RuntimeError, OSError) as e:  # Python 3.11: RuntimeError("Symlink loop ...")
            raise UserError(f"{key}={value}: cannot be resolved ({e}); give a real "
                            f"{kind}") from None
        if kind == "folder" and path.exists() and not path.is_dir():
            raise UserError(f"{key}={value}: is a file; give a folder")
        if kind == "file" and path.is_dir():
            raise UserError(f"{key}={value}: is a folder; give a file")


def check_devices(cfg) -> None:
    """The accelerator and device count exist on this machine. Imports torch only when a
    device is asked for by name or more than one device is asked for."""
    trainer = cfg.get("trainer") or {}
    accelerator, devices = trainer.get("accelerator", "auto"), trainer.get("devices", 1)
    if accelerator in ("auto", "cpu") and devices == 1:
        return
    import os

    import torch

    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise UserError(f"trainer.accelerator={accelerator}: no CUDA GPU on this machine; "
                        f"choices here: auto, cpu")
    if accelerator == "mps" and not torch.backends.mps.is_available():
        raise UserError("trainer.accelerator=mps: no Apple GPU on this machine; choices here: "
                        "auto, cpu")
    gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    have = torch.cuda.device_count() if gpu else (os.cpu_count() or 1)
    if devices > have:
        what = "GPUs" if gpu else "CPU cores (one process each)"
        raise UserError(f"trainer.devices={devices}: this machine has {have} {what}; give "
                        f"trainer.devices <= {have}")


# What a `_target_` the run instantiates must be: group -> (the class it must subclass, its name
# in messages, an example).
# Hydra's instantiate calls whatever a `_target_` names (a function as readily as a class): only
# a class of the expected kind is let through, resolved without calling anything.
TARGET_KINDS = {
    "callbacks": ("lightning.pytorch.callbacks.Callback", "Lightning Callback",
                  "lightning.pytorch.callbacks.EarlyStopping"),
    "logger": ("lightning.pytorch.loggers.Logger", "Lightning Logger",
               "lightning.pytorch.loggers.CSVLogger"),
    "scheduler": ("torch.optim.lr_scheduler.LRScheduler", "torch LR scheduler",
                  "torch.optim.lr_scheduler.StepLR"),
}


def _shipped_targets() -> frozenset:
    """The `_target_`s of the shipped callbacks, logger and scheduler configs: tested, so the
    preflight need not import Lightning or torch to check them."""
    import re

    found = set()
    for group in TARGET_KINDS:  # (group, target): a shipped callback is no trusted logger
        for path in (CONF_DIR / group).glob("*.yaml"):
            found.update((group, t) for t in re.findall(
                r"^\s*_target_:\s*([\w.]+)\s*$", path.read_text(), re.MULTILINE))
    return frozenset(found)


@functools.lru_cache(maxsize=1)
def _shipped_nodes() -> frozenset:
    """Every `_target_` node of the shipped callbacks, logger and scheduler configs, as written
    there (frozen): tested with these arguments, so check_arguments need not import their
    classes (and torch) for a command that leaves them as they are."""
    import yaml

    def nodes(value):
        if isinstance(value, dict):
            if "_target_" in value:
                yield value
            for v in value.values():
                yield from nodes(v)

    found = set()
    for group in TARGET_KINDS:
        for path in (CONF_DIR / group).glob("*.yaml"):
            found.update(_freeze(n) for n in nodes(yaml.safe_load(path.read_text())))
    return frozenset(found)


def target_nodes(cfg) -> list[tuple[str, object, str]]:
    """(where, node, group) for every node the run instantiates: each callback, each logger, and
    the scheduler's `make`."""
    nodes = [(f"{g}.{name}", node, g) for g in ("callbacks", "logger")
             for name, node in (cfg.get(g) or {}).items()]
    sched = cfg.get("scheduler") or {}
    if hasattr(sched, "get") and sched.get("make") is not None:
        nodes.append(("scheduler.make", sched.get("make"), "scheduler"))
    return nodes


def _nested_target(node, where: str) -> str | None:
    """The dotted key of a `_target_` inside `node` (below its own), or None: Hydra's
    instantiate would call it while making the node."""
    if hasattr(node, "_content"):  # an OmegaConf node: plain dicts and lists
        from omegaconf import OmegaConf

        node = OmegaConf.to_container(node, resolve=False)
    items = node.items() if isinstance(node, dict) else \
        enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        if isinstance(value, dict) and "_target_" in value:
            return f"{where}.{key}._target_"
        deeper = _nested_target(value, f"{where}.{key}")
        if deeper:
            return deeper
    return None


def check_targets(cfg, trusted: frozenset | None = None) -> None:
    """Every `_target_` the run instantiates, resolved without calling anything: a callback's
    must be a Lightning Callback class, a logger's a Lightning Logger class, the scheduler's
    `make` a torch LRScheduler class; a `_target_` nested inside one of them is refused. A
    function (builtins.open, os.system, eval, subprocess.run) or any other class is one line.
    Targets in `trusted` (the shipped ones) are not imported; any other imports its module, and
    Lightning or torch to compare with (the CLI calls this after every other check)."""
    trusted = _shipped_targets() if trusted is None else trusted
    for where, node, group in target_nodes(cfg):
        base_path, kind, example = TARGET_KINDS[group]
        target = node.get("_target_") if hasattr(node, "get") else None
        if not target:
            raise UserError(f"{where}: needs a _target_ (a {kind} class path), e.g. "
                            f"{where}._target_={example}")
        nested = _nested_target(node, where)
        if nested:
            raise UserError(f"{nested}: a _target_ inside {where} is refused (Hydra would call "
                            f"it while making {where}); give plain values there")
        if (group, target) not in trusted:
            check_class(f"{where}._target_", target, base_path, kind, example)


def check_class(where: str, target, base_path: str, kind: str, example: str) -> None:
    """`target` (a `_target_` value) names a class that subclasses `base_path`: found by
    importing its module, calling nothing; else one line (a function, another class, nothing)."""
    from hydra.utils import get_object

    hydra_log = logging.getLogger("hydra.utils")  # get_object logs its own error first
    level, hydra_log.level = hydra_log.level, logging.CRITICAL
    try:
        obj = get_object(str(target))  # imports the module, calls nothing in it
    except Exception:
        module, _, name = str(target).rpartition(".")
        raise UserError(f"{where}={target}: cannot be imported (no class {name!r} in "
                        f"{module or 'any module'}); give a full class path such as "
                        f"{example}") from None
    finally:
        hydra_log.level = level
    base = get_object(base_path)  # one of the harness's own base classes (Lightning, torch)
    if not isinstance(obj, type):
        what = "function" if callable(obj) else type(obj).__name__
        raise UserError(f"{where}={target}: refused: a {what}, not a {kind} class (only a "
                        f"subclass of {base_path} is made from the config, e.g. {example})")
    if not issubclass(obj, base):
        raise UserError(f"{where}={target}: not a {kind} (a subclass of {base_path} is "
                        f"needed, e.g. {example})")


# Values the shipped Lightning callbacks need beyond their type annotations. Lightning checks
# some only when the callback is made, after the run has started, and EarlyStopping's patience
# never: class path -> {argument: (predicate, what is valid)}; a subclass gets its base's rules.
CALLBACK_CHECKS = {
    "lightning.pytorch.callbacks.EarlyStopping": {
        "mode": (lambda v: v in ("min", "max"), "one of: min, max"),
        "patience": (lambda v: _is_int(v) and v >= 0,
                     "an integer >= 0 (validations without improvement before stopping)"),
        "min_delta": (lambda v: _is_num(v), "a finite number"),
    },
    "lightning.pytorch.callbacks.ModelCheckpoint": {
        "mode": (lambda v: v in ("min", "max"), "one of: min, max"),
        "every_n_train_steps": (lambda v: v is None or (_is_int(v) and v >= 0),
                                "null or an integer >= 0 (optimizer steps between files)"),
        "every_n_epochs": (lambda v: v is None or (_is_int(v) and v >= 0),
                           "null or an integer >= 0 (epochs between files)"),
        "save_top_k": (lambda v: _is_int(v) and v >= -1,
                       "an integer >= -1 (-1: keep every file)"),
    },
}


def _check_known_callback(where: str, node) -> None:
    """The ranges of CALLBACK_CHECKS for a callback whose `_target_` names one of those classes,
    torch-free (validate calls it; check_arguments covers subclasses and other spellings)."""
    target = node.get("_target_") if hasattr(node, "get") else None
    rules = CALLBACK_CHECKS.get(target) if isinstance(target, str) else None
    for key, (ok, valid) in (rules or {}).items():
        if key in node and not ok(node[key]):
            raise UserError(f"{where}.{key}={_show(node[key])}: {target.rpartition('.')[2]}'s "
                            f"{key} must be {valid}")


# Arguments the harness passes itself (train.py), so a node need not give them.
SUPPLIED_ARGUMENTS = {"logger": ("save_dir", "purge_step"), "scheduler": ("optimizer",)}


def check_arguments(cfg) -> None:
    """Every argument a callback, logger or scheduler node passes to its class, checked against
    the class's own signature before anything runs: a name it does not take, a value that does
    not fit the parameter's type annotation, a required one missing, and the ranges of
    CALLBACK_CHECKS. Imports the classes (Lightning, torch): the CLI calls it once the torch-free
    checks have passed, and after check_targets has vetted every `_target_`."""
    cfg = resolved(cfg)
    horizon = (cfg.get("scheduler") or {}).get("horizon")
    for where, node, group in target_nodes(cfg):
        if not isinstance(node, dict) or not isinstance(node.get("_target_"), str):
            continue  # check_targets reports these
        if _freeze(node) in _shipped_nodes():  # as shipped (and tested): no import needed
            continue
        supplied = (*SUPPLIED_ARGUMENTS.get(group, ()), *([horizon] if group == "scheduler"
                                                         and horizon else []))
        _check_node_arguments(where, node["_target_"], _freeze(node), tuple(supplied))


def _freeze(value):
    """A hashable copy of a plain config value (the cache key of _check_node_arguments)."""
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, list):
        return ("__list__", *(_freeze(v) for v in value))
    return value


@functools.lru_cache(maxsize=4096)  # a sweep of 1,000 jobs checks each distinct node once
def _check_node_arguments(where: str, target: str, frozen: tuple, supplied: tuple) -> None:
    import inspect
    import typing

    from hydra.utils import get_object

    node = dict(frozen)
    try:
        cls = get_object(target)
        params = inspect.signature(cls).parameters
    except Exception:  # not importable or no signature: check_targets says what it is
        return
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # annotations that do not evaluate: names are still checked
        hints = {}
    name = getattr(cls, "__name__", target)
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    named = [p for p in params if params[p].kind not in (inspect.Parameter.VAR_POSITIONAL,
                                                         inspect.Parameter.VAR_KEYWORD)]
    for key, value in node.items():
        if key.startswith("_"):  # Hydra's own: _target_, _partial_, _args_, _recursive_
            continue
        if key in supplied:  # the harness's value would clash with it, or silently win
            raise UserError(f"{where}.{key}: set by autograd-lab itself (from the run); "
                            f"remove it from {where}")
        if key not in params:
            if takes_any:
                continue
            raise UserError(f"{where}.{key}: {name} takes no argument {key!r}"
                            + did_you_mean(key, named)
                            + f"; it takes: {', '.join(p for p in named if p not in supplied)}")
        value = _thaw(value)
        hint = hints.get(key)
        if hint is not None and not _fits(value, hint):
            raise UserError(f"{where}.{key}={_show(value)}: {name}'s {key} must be "
                            f"{_describe(hint)}")
        for path, rules in CALLBACK_CHECKS.items():
            if key in rules and _is_subclass(cls, path):
                ok, valid = rules[key]
                if not ok(value):
                    raise UserError(f"{where}.{key}={_show(value)}: {name}'s {key} must "
                                    f"be {valid}")
    if "_args_" not in node:
        missing = [p for p, param in params.items() if param.default is inspect.Parameter.empty
                   and param.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                      inspect.Parameter.KEYWORD_ONLY)
                   and p not in node and p not in supplied]
        if missing:
            raise UserError(f"{where}: {name} needs {', '.join(missing)}; give "
                            f"{where}.{missing[0]}=...")


def _thaw(value):
    if isinstance(value, tuple) and value[:1] == ("__list__",):
        return [_thaw(v) for v in value[1:]]
    if isinstance(value, tuple):
        return {k: _thaw(v) for k, v in value}
    return value


def _is_subclass(cls, path: str) -> bool:
    from hydra.utils import get_object

    try:
        return isinstance(cls, type) and issubclass(cls, get_object(path))
    except (ImportError, AttributeError):
        return False


def _fits(value, hint) -> bool:
    """Whether a config value can be passed where `hint` is annotated. A type no config value
    can spell (timedelta, Optimizer) passes: the class says what it thinks of it."""
    import types
    import typing

    origin = typing.get_origin(hint)
    if hint is typing.Any:
        return True
    if origin is typing.Union or origin is types.UnionType:
        return any(_fits(value, a) for a in typing.get_args(hint))
    if origin is typing.Literal:
        return any(value == a and type(value) is type(a) for a in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return _is_int(value)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str or hint is Path or hint is os.PathLike:
        return isinstance(value, str)
    if origin in (list, tuple) or hint in (list, tuple):
        return isinstance(value, list)
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    return True


def _describe(hint) -> str:
    """A type annotation in the words of the error lines: "an integer", "null or a string"."""
    import types
    import typing

    origin = typing.get_origin(hint)
    if origin is typing.Union or origin is types.UnionType:
        args = typing.get_args(hint)
        words = [_describe(a) for a in args if a is not type(None)]
        words = list(dict.fromkeys(words))
        return " or ".join((["null"] if type(None) in args else []) + words)
    if origin is typing.Literal:
        return "one of: " + ", ".join(a if isinstance(a, str) else _show(a)
                                      for a in typing.get_args(hint))
    words = {type(None): "null", bool: "true or false", int: "an integer", float: "a number",
             str: "a string", Path: "a path"}
    if hint in words:
        return words[hint]
    if origin in (list, tuple) or hint in (list, tuple):
        return "a list"
    return getattr(hint, "__name__", str(hint))


def _validate_keys(cfg) -> None:
    for key, (ok, valid) in CHECKS.items():
        value = _get(cfg, key)
        if value is _MISSING:
            continue
        if hasattr(value, "_content") or hasattr(value, "keys"):  # OmegaConf containers
            from omegaconf import OmegaConf

            value = OmegaConf.to_container(value)
        if not ok(value):
            options = valid.split("one of", 1)[1].lstrip(": ").split(", ") \
                if isinstance(value, str) and "one of" in valid else []
            raise UserError(f"{key}={_show(value)}: must be {valid}"
                            + did_you_mean(value, options))


def _show(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return repr(value) if isinstance(value, str) else str(value)


def compose(overrides=(), config_name: str = "train", return_hydra_config: bool = False):
    """The config `autograd-lab train <overrides>` would run, composed by Hydra's compose API.

    The one compose helper: the CLI's tools, the tests, the notebooks and the scripts use it.
    Raises UserError (one line) for an unknown group, key or value."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            return _compose(hydra_compose, list(overrides), return_hydra_config,
                            config_name=config_name)
    finally:
        GlobalHydra.instance().clear()


# ---------------------------------------------------------------- composing before Hydra runs
def _is_hydra_override(text: str) -> bool:
    return text.lstrip("+~").startswith(("hydra.", "hydra/", "hydra="))


class SweepPlan:
    """What a command's overrides say about naming its directories: the keys it sweeps (on the
    command line or in a study preset's hydra.sweeper.params), the overrides that stay constant
    across its jobs (their input lines), and the study the preset names."""

    def __init__(self, swept: list[str], fixed: list, study: str | None,
                 preset_fixed: list[str] = ()):
        self.swept, self.fixed, self.study = swept, fixed, study
        self.preset_fixed = list(preset_fixed)  # one-value sweeper params of a preset
        self.first_job: list[str] = []  # the first job's overrides (set by check_overrides)

    @property
    def constant_keys(self) -> list[str]:
        return [o.key_or_group for o in self.fixed] + self.preset_fixed

    def sweep_dir(self, root: str = "multirun") -> str:
        """multirun/<study>/<the constant overrides that change results>: the same command finds
        its sweep again (completed jobs are skipped, an interrupted one continues)."""
        lines = sorted(o.input_line for o in self.fixed
                       if is_result_key(o.key_or_group) and o.key_or_group != "experiment")
        name = path_safe(",".join(lines)) if lines else "defaults"
        for char, code in (("'", "%27"), ("\\", "%5C"), ("$", "%24")):  # Hydra quoting
            name = name.replace(char, code)
        return "/".join(p for p in (root, self.study, name) if p)

    def hydra_overrides(self, given: list[str]) -> list[str]:
        """The Hydra overrides that name a multirun's directories by what differs: the sweep
        folder by the constant overrides (unless hydra.sweep.dir is given), each job's folder
        (and so its TensorBoard run name) by the swept keys alone."""
        out = []
        if not any(a.startswith("hydra.sweep.dir=") for a in given):
            out.append(f"hydra.sweep.dir='{self.sweep_dir()}'")
        if not any(a.startswith("hydra.job.config.override_dirname.exclude_keys=")
                   for a in given):
            keys = dict.fromkeys([*NON_RESULT_KEYS, *self.constant_keys])
            out.append("hydra.job.config.override_dirname.exclude_keys=["
                       + ",".join(f"'{k}'" for k in keys) + "]")
        return out


def run_problems(cfg, files: bool = True) -> list[str]:
    """What would stop this run that can be told without torch, one line each: freeze globs and
    a detach point against the model's declared names; with `files`, also the CIFAR-10 files
    and pretrained weights (not when the command only prints the config)."""
    import fnmatch

    problems = []
    model, train = cfg.get("model") or {}, cfg.get("train") or {}
    modules = list(model.get("module_names") or [])
    params = list(model.get("parameter_names") or [])
    prefixes = list(dict.fromkeys(p.split(".")[0] for p in params))
    freeze = train.get("freeze") or []
    if hasattr(freeze, "_content"):  # an OmegaConf list
        from omegaconf import OmegaConf

        freeze = OmegaConf.to_container(freeze)
    patterns = [freeze] if isinstance(freeze, str) else freeze if isinstance(freeze, list) else []
    for pattern in patterns:  # a value of the wrong type is the schema's to report
        if not params or not isinstance(pattern, str) or pattern == "backbone":
            continue
        if not any(fnmatch.fnmatchcase(p, pattern) or fnmatch.fnmatchcase(p, pattern + ".*")
                   for p in params):
            names = list(dict.fromkeys([*prefixes, *modules, *params]))  # each once
            problems.append(
                f"train.freeze={pattern!r}: matches no parameter of {model.get('name')}"
                + did_you_mean(pattern, names)
                + f"; parameter names start with: {', '.join(prefixes)} (or use backbone)")
    detach = train.get("detach_at")
    if isinstance(detach, str) and modules and detach not in modules:
        top = [m for m in modules if "." not in m]
        inner = next((m for m in modules if "." in m), None)
        problems.append(
            f"train.detach_at={detach!r}: {model.get('name')} has no such module"
            + did_you_mean(detach, modules)
            + f"; modules are: {', '.join(top)}"
            + (f" (or dotted names inside them, e.g. {inner})" if inner else ""))
    if not files:
        return problems
    problems += _data_problems(cfg)
    problems += _memory_problems(cfg)
    weights = model.get("weights")
    files = model.get("weights_files") or {}
    if isinstance(weights, str) and weights in files:
        home = Path(os.environ.get("TORCH_HOME") or Path(
            os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "torch")
        folder = home / "hub" / "checkpoints"
        if not (folder / files[weights]).is_file():
            problems.append(f"model.weights={weights}: {files[weights]} is not in {folder}; put "
                            f"it there (from download.pytorch.org/models/) or set TORCH_HOME, "
                            f"or use model.weights=null")
    return problems


# torchvision's CIFAR10.url (what the seed's CIFAR10(download=True) fetches)
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
PROBE_TIMEOUT_S = 5.0  # how long data.download waits to learn that the host cannot be reached


def cifar10_url() -> str:
    """Where data.download fetches cifar-10-python.tar.gz: torchvision's URL, or a mirror named
    by the environment variable AUTOGRAD_LAB_CIFAR10_URL (the tests point it at a local server).
    The archive is checked against torchvision's md5 wherever it comes from."""
    return os.environ.get("AUTOGRAD_LAB_CIFAR10_URL") or CIFAR10_URL


_probed: dict[str, tuple[float, str | None]] = {}


def unreachable(url: str, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """Why `url` cannot be downloaded (asked with an HTTP HEAD request), or None. Bounded by
    `timeout` seconds in all: the name lookup, which no socket timeout covers, runs in a thread
    that is not waited for beyond it. One answer per URL a minute (a sweep checks every job)."""
    import threading
    import time
    import urllib.error
    import urllib.parse
    import urllib.request

    if url in _probed and time.monotonic() - _probed[url][0] < 60:
        return _probed[url][1]
    if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        return "not an http(s) URL"
    answer: list = []

    def connect() -> None:
        try:
            request = urllib.request.Request(url, method="HEAD")
            with urllib.request.urlopen(request, timeout=timeout):
                answer.append(None)
        except urllib.error.HTTPError as e:  # a server that does not answer HEAD may still GET
            answer.append(None if e.code in (405, 501) else f"HTTP {e.code} {e.reason}")
        except urllib.error.URLError as e:
            reason = e.reason
            answer.append(getattr(reason, "strerror", None) or str(reason))
        except (OSError, ValueError) as e:  # time-outs, a malformed URL
            answer.append(getattr(e, "strerror", None) or str(e) or type(e).__name__)

    worker = threading.Thread(target=connect, daemon=True)
    worker.start()
    worker.join(timeout)
    why = answer[0] if answer else f"no answer within {timeout:g} s"
    _probed[url] = (time.monotonic(), why)
    return why


def cannot_download(root: Path, url: str, why: str) -> str:
    """The one line for CIFAR-10 missing where it cannot be downloaded."""
    return (f"data=cifar10: CIFAR-10 is not in data.root={root.resolve()} and cannot be "
            f"downloaded from {url} ({why}); put cifar-10-python.tar.gz (or its extracted "
            f"cifar-10-batches-py/) there, or use data=synthetic (runs offline)")


# What a synthetic data set needs in memory, per 3x32x32 image: data.make_synthetic builds a
# split as float32 images with up to four whole-split temporaries alive at once (4 x 12,288 B;
# measured: 1.9 GB at the peak for 40,000 images); reading it back holds the uint8 images
# (3,072 B) beside the decode cache's two serialised copies. Plus the process itself (torch,
# Lightning, the model): about half a GiB.
SYNTHETIC_WRITE_BYTES = 4 * 4 * 3 * 32 * 32
SYNTHETIC_READ_BYTES = 3 * 3 * 32 * 32
PROCESS_BYTES = 2**29


def synthetic_key(data) -> str:
    """The folder name (under data.root/synthetic/) of a synthetic data set: its sizes, noise
    and seed; data.write_synthetic writes it there once."""
    import hashlib

    text = (f"{data['train_size']}-{data['test_size']}-{float(data['noise'])}-"
            f"{data['synthetic_seed']}-v2")
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def available_memory() -> int | None:
    """Bytes this process can still allocate: the kernel's MemAvailable, or less where a
    cgroup (a container, a SLURM job) sets a lower limit; None where neither can be read."""
    found = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        try:
            found.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError, AttributeError):
            pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            found.append(max(int(limit) - used, 0))
    except (OSError, ValueError):
        pass
    return min(found) if found else None


def _memory_problems(cfg) -> list[str]:
    """A synthetic data set larger than this machine's free memory: one line with what it
    needs, what is available and the largest size that fits, instead of an allocation failure
    (or the OOM killer) once the run has started."""
    data = cfg.get("data") or {}
    train, test = data.get("train_size"), data.get("test_size")
    if data.get("name") != "synthetic" or not (_is_int(train) and _is_int(test)
                                               and _is_num(data.get("noise"))):
        return []
    available = available_memory()
    if available is None:
        return []
    root = Path(str(data.get("root") or ".")).expanduser()
    written = (root / "synthetic" / synthetic_key(data) / "cifar-10-batches-py" /
               "manifest.json").is_file()
    write = 0 if written else SYNTHETIC_WRITE_BYTES * max(train, test)
    need = PROCESS_BYTES + max(write, SYNTHETIC_READ_BYTES * (train + test))
    if need <= available:
        return []
    key, size = ("data.train_size", train) if train >= test else ("data.test_size", test)
    other = test if key == "data.train_size" else train
    room = available - PROCESS_BYTES
    fits = min(room // SYNTHETIC_READ_BYTES - other,
               room // SYNTHETIC_WRITE_BYTES if not written else room)
    how = ("written as float32 images, 48 KiB each at the peak" if write >= SYNTHETIC_READ_BYTES
           * (train + test) else "held as uint8 images beside the decode cache's copies")
    advice = (f"give {key} <= {max(fits, 0):,}" if fits >= 5 else
              "free memory or use a machine with more")
    return [f"{key}={size}: the synthetic data set needs about {need / 2**30:.1f} GiB of "
            f"memory ({how}) and this machine has {available / 2**30:.1f} GiB available; "
            f"{advice}"]


def _data_problems(cfg) -> list[str]:
    """CIFAR-10 missing from data.root: with data.download (the default) a problem only when
    its URL cannot be reached within a few seconds (the run downloads it otherwise)."""
    data = cfg.get("data") or {}
    if data.get("name") != "cifar10" or not isinstance(data.get("root"), str):
        return []
    root = Path(str(data.get("root") or ".")).expanduser()
    if (root / "cifar-10-batches-py").is_dir() or (root / "cifar-10-python.tar.gz").is_file():
        return []
    if data.get("download"):
        url = cifar10_url()
        why = unreachable(url)
        return [] if why is None else [cannot_download(root, url, why)]
    return [f"data=cifar10: CIFAR-10 not found in data.root={root.resolve()}; put "
            f"cifar-10-python.tar.gz (or its extracted cifar-10-batches-py/) there, set "
            f"data.download=true, or use data=synthetic (runs offline)"]


# Config nodes whose keys the harness reads by name: a key added to one with `+` would be read by
# nothing (`+trainer.max_epoch=3` trained the default epochs). `+` stays open for the nodes
# that are class arguments: callbacks, logger and scheduler.make.
CLOSED_NODES = ("train", "trainer", "data", "optim", "model", "eval", "log", "checkpoint",
                "probes", "profiler", "scheduler")
OPEN_NODES = ("scheduler.make",)


def _refuse_added_keys(compose, parsed, base: list[str]) -> None:
    """`+key=value` under a node whose keys are fixed: one line naming the key, the closest
    existing one and the keys there are."""
    added = [o for o in parsed if o.is_add() and "." in o.key_or_group
             and o.key_or_group.split(".")[0] in CLOSED_NODES
             and not any(o.key_or_group.startswith(n + ".") for n in OPEN_NODES)]
    if not added:
        return
    cfg = _compose(compose, [b for b, o in zip(base, parsed, strict=True) if o not in added],
                   return_hydra=False)
    for o in added:
        parent, _, leaf = o.key_or_group.rpartition(".")
        node = _get(cfg, parent)
        if node is _MISSING or not hasattr(node, "keys"):
            continue  # a node that does not exist: Hydra's own message says so
        keys = sorted(str(k) for k in node.keys())
        raise UserError(f"+{o.key_or_group}: {parent} has no key {leaf!r}"
                        + did_you_mean(leaf, keys)
                        + f"; nothing would read it: keys in {parent} are: {', '.join(keys)}")


def check_overrides(overrides: list[str], multirun: bool, files: bool = True) -> SweepPlan:
    """Compose the config for every job the overrides describe and validate each (`files`:
    also check the data and weight files a run would read; not for `--cfg`, which runs nothing).

    Uses Hydra's own parser and compose API, so what passes here composes the same way in the run.
    Returns how the command names its directories (SweepPlan).
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    parsed = []
    for text in overrides:
        if _is_hydra_override(text):
            continue
        try:
            parsed.append(parser.parse_override(text))
        except HydraException as e:
            raise UserError(f"{text}: not a valid override ({_first_line(str(e))})") from None

    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3", job_name="check"):
        base = [_first_choice(o) for o in parsed]
        _refuse_added_keys(compose, parsed, base)
        cfg = _compose(compose, base, return_hydra=True)
        sweeps = {o.get_key_element(): o for o in parsed if o.is_sweep_override()}
        preset_fixed: list = []
        if multirun:  # a study preset may declare its own sweep (hydra.sweeper.params)
            params = cfg.hydra.sweeper.get("params") or {}
            for key, values in params.items():
                override = parser.parse_override(f"{key}={values}")
                if key in sweeps:
                    continue
                if override.is_sweep_override():
                    sweeps[key] = override
                else:  # one value: a constant the preset sets through the sweeper
                    preset_fixed.append(override)
        elif sweeps:
            key = next(iter(sweeps))
            raise UserError(f"{key}: a comma list or sweep needs -m (multirun), e.g. "
                            f"autograd-lab train -m {key}=...")
        fixed_overrides = [o for o in parsed if o.get_key_element() not in sweeps]
        fixed = [o.input_line for o in [*fixed_overrides, *preset_fixed]]
        plan = SweepPlan([o.key_or_group for o in sweeps.values()], fixed_overrides,
                         cfg.get("study"), [o.key_or_group for o in preset_fixed])
        # the first job's overrides (each sweep at its first value): what `-m ... --cfg` prints
        plan.first_job = base + [_first_choice(o) for o in [*sweeps.values(), *preset_fixed]
                                 if all(o is not p for p in parsed)]
        # the shipped callbacks, loggers and schedulers are tested; any other _target_ is
        # imported (and Lightning or torch with it) to check what it is, calling nothing
        shipped = _shipped_targets()
        problems: list[str] = []  # every problem of every job, each once, reported together
        jobs = []  # every job, checked before the first one starts
        for job in _sweep_jobs(compose, fixed, sweeps, parser):
            try:
                job = resolved(job)
            except UserError as e:
                problems.append(str(e))
                continue
            try:
                validate(job)
                check_targets(job, shipped)
                check_devices(job)
                jobs.append(job)
            except UserError as e:
                problems.append(str(e))
            problems += run_problems(job, files)
        problems += duplicate_runs(jobs, sweeps)  # two jobs, one run: one folder, one result
        if files and not problems:  # a run follows, importing these classes anyway
            for job in jobs:
                try:
                    check_arguments(job)
                except UserError as e:
                    problems.append(str(e))
    GlobalHydra.instance().clear()
    if problems:
        raise UserError("\n".join(dict.fromkeys(problems)))
    return plan


def duplicate_runs(jobs: list[dict], sweeps: dict) -> list[str]:
    """One line if two jobs of a sweep are the same run (config.identity_key): they would land
    in one folder, the second skipping or overwriting the first. Names the swept key and why:
    a value given twice, or keys that change no result (NON_RESULT_KEYS)."""
    import json

    seen: dict[str, int] = {}
    for i, job in enumerate(jobs):
        key = identity_key(job)
        if key not in seen:
            seen[key] = i
            continue
        first, other = flatten(jobs[seen[key]]), flatten(job)
        differ = sorted(k for k in {*first, *other} if first.get(k, _MISSING) != other.get(
            k, _MISSING))
        if differ:
            shown = sweeps[differ[0]].input_line if differ[0] in sweeps else differ[0]
            return [f"{shown}: {', '.join(differ)} does not change a run's results "
                    f"(config.NON_RESULT_KEYS), so these jobs are one run and would share one "
                    f"folder; run each value as its own command, with its own hydra.sweep.dir"]
        for override in sweeps.values():
            values = [json.dumps(v, sort_keys=True, default=str)
                      for v in override.sweep_iterator()]
            if len(set(values)) < len(values):
                return [f"{override.input_line}: a value given twice (each job would be the "
                        f"same run, in one folder); give each value once"]
        return [f"{', '.join(o.input_line for o in sweeps.values())}: two jobs of this sweep "
                f"are the same run (the same configuration); give each configuration once"]
    return []


def _sweep_jobs(compose, fixed: list[str], sweeps: dict, parser):
    """Every job of a sweep as Hydra would compose it, quickly: one compose per combination of
    the swept config groups (and of swept +/~ overrides, which change the config's shape), and
    for each of those every combination of the swept plain values set on that config, as
    Hydra's own ConfigLoader sets a value override (OmegaConf.update, merge=True). A 1,000-job
    sweep of values costs one compose, not 1,000. Yields each job's config, resolved (plain)."""
    from omegaconf import OmegaConf

    def is_value(o) -> bool:
        key = o.key_or_group
        return (o.package is None and not (o.is_add() or o.is_delete() or o.is_force_add())
                and "/" not in key and not (CONF_DIR / key).is_dir())

    shape = {k: o for k, o in sweeps.items() if not is_value(o)}
    values = {k: o for k, o in sweeps.items() if is_value(o)}
    shape_choices = [[f"{k}={v}" for v in o.sweep_string_iterator()] for k, o in shape.items()]
    value_choices = [[f"{k}={v}" for v in o.sweep_string_iterator()] for k, o in values.items()]
    from omegaconf.errors import OmegaConfBaseException

    parsed = functools.lru_cache(maxsize=None)(parser.parse_override)
    for shape_combo in itertools.product(*shape_choices):
        first = [choices[0] for choices in value_choices]
        cfg = _compose(compose, fixed + list(shape_combo) + first, return_hydra=False)
        base = None
        for value_combo in itertools.product(*value_choices):
            for text in value_combo:  # every job sets every swept value: nothing leaks over
                override = parsed(text)
                OmegaConf.update(cfg, override.key_or_group, override.value(), merge=True)
            if base is None:  # the whole config resolved once (every ${...} in it checked);
                base = resolved(cfg)  # later jobs re-resolve only what a swept value can move
                raw = flatten(OmegaConf.to_container(cfg, resolve=False))
                moving = [*values, *(k for k, v in raw.items() if "${" in str(v))]
                yield base
                continue
            job = _copy_tree(base)
            for key in moving:
                try:
                    value = OmegaConf.select(cfg, key, throw_on_missing=False)
                except OmegaConfBaseException as e:
                    raise _unresolvable(cfg, e) from None
                if OmegaConf.is_config(value):
                    value = resolved(value)
                _set_dotted(job, key, value)
            yield job


def _copy_tree(d):
    """A copy of a plain config tree (dicts and lists), quicker than copy.deepcopy."""
    if isinstance(d, dict):
        return {k: _copy_tree(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_copy_tree(v) for v in d]
    return d


def _set_dotted(d: dict, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        d = d[part]
    d[leaf] = value


def _first_choice(override) -> str:
    if override.is_sweep_override():
        return f"{override.get_key_element()}={next(iter(override.sweep_string_iterator()))}"
    return override.input_line


def _compose(compose, overrides: list[str], return_hydra: bool, config_name: str = "train"):
    from hydra.errors import ConfigCompositionException, MissingConfigException
    from omegaconf.errors import OmegaConfBaseException

    try:
        return compose(config_name, overrides=overrides, return_hydra_config=return_hydra)
    except MissingConfigException as e:
        raise UserError(_missing_group_message(e, overrides)) from None
    except (ConfigCompositionException, OmegaConfBaseException) as e:
        raise UserError(_composition_message(e, overrides, compose)) from None


def _missing_group_message(e, overrides: list[str]) -> str:
    missing = getattr(e, "missing_cfg_file", None) or ""
    group, _, name = str(missing).rpartition("/")
    options = getattr(e, "options", None)
    if not options and group:
        options = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
    if group and options is not None:
        return (f"{group}={name}: no such {group}{did_you_mean(name, options)}; choices are: "
                f"{', '.join(sorted(options))}")
    return _first_line(str(e))


def _composition_message(e, overrides: list[str], compose) -> str:
    text = str(e)
    for ov in overrides:
        key = ov.split("=", 1)[0].lstrip("+~")
        if f"'{key}'" in text or f"'{key.split('.')[-1]}'" in text:
            parent, _, leaf = key.rpartition(".")
            rest = [o for o in overrides if o is not ov]
            try:
                cfg = compose("train", overrides=rest)
                node = _get(cfg, parent) if parent else cfg
                if node is not _MISSING and hasattr(node, "keys"):
                    where = f"keys in {parent}" if parent else "top-level keys and groups"
                    return (f"{key}: no such key{did_you_mean(leaf, node.keys())}; {where} "
                            f"are: {', '.join(sorted(node.keys()))}")
            except Exception:  # the other overrides are broken too: fall back to Hydra's words
                pass
    return _first_line(text)


def _first_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return " ".join(lines[:2]) if lines else text


_register_resolvers()
