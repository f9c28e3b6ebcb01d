"""Config checks that turn a user's mistake into one line naming the bad value and the valid ones.

Hydra parses and composes the config; this module only adds what Hydra cannot know: which values
make sense. `check_overrides` runs before Hydra creates any directory (the CLI calls it), so a
typo never leaves a half-made run directory behind. `validate` runs again inside the job, so
`python -m autograd_lab.train` gets the same checks. No torch import here: it must stay fast.
"""

from __future__ import annotations

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
    OmegaConf.register_new_resolver(
        "autograd_lab_non_result_keys", lambda: list(NON_RESULT_KEYS), replace=True)


class UserError(Exception):
    """A mistake in what the user asked for. Shown as one line, never as a traceback."""


def error_text(e: BaseException) -> str:
    """What a run record and a message say of an error: a user's mistake as its own words, a
    bug with its type."""
    return str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}"


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
    """Raise UserError for the first value in `cfg` that is not valid."""
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
        monitor = node.get("monitor") if hasattr(node, "get") else None
        if monitor is not None and monitor not in LOGGED_METRICS:
            raise UserError(f"callbacks.{name}.monitor={_show(monitor)}: no such metric; the "
                            f"run logs: {', '.join(LOGGED_METRICS)}")
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


def check_targets(cfg) -> None:
    """Every `_target_` in the callbacks and logger groups imports and is a Lightning callback or
    logger. Imports Lightning (and so torch): the CLI calls it after every other check."""
    groups = {"callbacks": "Callback", "logger": "Logger"}
    nodes = [(f"{g}.{name}", node, base) for g, base in groups.items()
             for name, node in (cfg.get(g) or {}).items()]
    if not nodes:
        return
    from hydra.utils import get_class
    from lightning.pytorch import Callback
    from lightning.pytorch.loggers import Logger

    bases = {"Callback": Callback, "Logger": Logger}
    for where, node, base in nodes:
        target = node.get("_target_") if hasattr(node, "get") else None
        if not target:
            raise UserError(f"{where}: needs a _target_ (a Lightning {base} class path), e.g. "
                            f"{where}._target_=lightning.pytorch.callbacks.EarlyStopping")
        hydra_log = logging.getLogger("hydra.utils")  # get_class logs its own error first
        level, hydra_log.level = hydra_log.level, logging.CRITICAL
        try:
            cls = get_class(target)
        except Exception:
            module, _, name = str(target).rpartition(".")
            raise UserError(f"{where}._target_={target}: cannot be imported (no class {name!r} "
                            f"in {module or 'any module'}); give a full class path such as "
                            f"lightning.pytorch.callbacks.EarlyStopping") from None
        finally:
            hydra_log.level = level
        if not issubclass(cls, bases[base]):
            raise UserError(f"{where}._target_={target}: not a Lightning {base} (a subclass of "
                            f"{bases[base].__module__}.{base} is needed)")


def _validate_keys(cfg) -> None:
    for key, (ok, valid) in CHECKS.items():
        value = _get(cfg, key)
        if value is _MISSING:
            continue
        if hasattr(value, "_content") or hasattr(value, "keys"):  # OmegaConf containers
            from omegaconf import OmegaConf

            value = OmegaConf.to_container(value)
        if not ok(value):
            raise UserError(f"{key}={_show(value)}: must be {valid}")


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
    import difflib
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
            close = difflib.get_close_matches(str(pattern), names, n=2)
            problems.append(
                f"train.freeze={pattern!r}: matches no parameter of {model.get('name')}"
                + (f" (did you mean {' or '.join(close)}?)" if close else "")
                + f"; parameter names start with: {', '.join(prefixes)} (or use backbone)")
    detach = train.get("detach_at")
    if isinstance(detach, str) and modules and detach not in modules:
        close = difflib.get_close_matches(str(detach), modules, n=2)
        top = [m for m in modules if "." not in m]
        inner = next((m for m in modules if "." in m), None)
        problems.append(
            f"train.detach_at={detach!r}: {model.get('name')} has no such module"
            + (f" (did you mean {' or '.join(close)}?)" if close else "")
            + f"; modules are: {', '.join(top)}"
            + (f" (or dotted names inside them, e.g. {inner})" if inner else ""))
    if not files:
        return problems
    problems += _data_problems(cfg)
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


def _data_problems(cfg) -> list[str]:
    data = cfg.get("data") or {}
    if data.get("name") != "cifar10" or data.get("download") or not isinstance(
            data.get("root"), str):
        return []
    root = Path(str(data.get("root") or ".")).expanduser()
    if (root / "cifar-10-batches-py").is_dir() or (root / "cifar-10-python.tar.gz").is_file():
        return []
    return [f"data=cifar10: CIFAR-10 not found in data.root={root.resolve()}; put "
            f"cifar-10-python.tar.gz (or its extracted cifar-10-batches-py/) there, set "
            f"data.download=true, or use data=synthetic (runs offline)"]


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
        choices = [[f"{k}={v}" for v in o.sweep_string_iterator()] for k, o in sweeps.items()]
        # the shipped loggers and callbacks are tested; a _target_ the user typed is imported
        # (and Lightning with it) only when an override names one
        typed = any(o.get_key_element().lstrip("+~").startswith(("callbacks", "logger"))
                    for o in parsed)
        problems: list[str] = []  # every problem of every job, each once, reported together
        for combo in itertools.islice(itertools.product(*choices), 256):
            job = _compose(compose, fixed + list(combo), return_hydra=False)
            try:
                validate(job)
                if typed:
                    check_targets(job)
                check_devices(job)
            except UserError as e:
                problems.append(str(e))
            problems += run_problems(job, files)
    GlobalHydra.instance().clear()
    if problems:
        raise UserError("\n".join(dict.fromkeys(problems)))
    return plan


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
        return f"{group}={name}: no such {group}; choices are: {', '.join(sorted(options))}"
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
                    return f"{key}: no such key; {where} are: {', '.join(sorted(node.keys()))}"
            except Exception:  # the other overrides are broken too: fall back to Hydra's words
                pass
    return _first_line(text)


def _first_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return " ".join(lines[:2]) if lines else text


_register_resolvers()
