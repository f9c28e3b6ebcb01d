"""Which `_target_` a config may make, and with which arguments.

A `_target_` from the command line is resolved without being called and must be a class of
its kind (a Lightning Callback, Logger or Trainer, a torch Module, Optimizer or LRScheduler, a
Hydra Callback, Launcher or Sweeper); its arguments must fit its signature. Shipped nodes are
trusted. Torch-free."""

from __future__ import annotations

import functools
import logging

from autograd_lab.config.annotations import describe, fits, freeze, thaw
from autograd_lab.config.keys import CONF_DIR, is_int, is_num, resolved, show_value
from autograd_lab.errors import UserError, did_you_mean

# Hydra's own nodes that it makes from a `_target_` as it starts (before any check of ours): the
# class each must subclass, and an example
HYDRA_TARGETS = {
    "hydra.callbacks": ("hydra.experimental.callback.Callback", "Hydra Callback",
                        "autograd_lab.sweep.summary.SummaryCallback"),
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
    "trainer": ("lightning.pytorch.Trainer", "Lightning Trainer", "lightning.pytorch.Trainer"),
    "model": ("torch.nn.Module", "torch Module", "autograd_lab.model.networks.SmallNet"),
    "optim": ("torch.optim.Optimizer", "torch optimizer", "torch.optim.AdamW"),
    "probes": ("autograd_lab.observe.probes.Probes", "Probes callback",
               "autograd_lab.observe.probes.Probes"),
    "profiler": ("autograd_lab.observe.profiling.TorchProfiler", "TorchProfiler callback",
                 "autograd_lab.observe.profiling.TorchProfiler"),
}

# The keys of a node above that are the harness's own, not arguments of its class (a label,
# the declared names the preflight checks globs against, a file the harness loads itself, the
# bar it chooses): read by the harness, never passed (`arguments`).
OWN_KEYS = {
    "trainer": ("progress_bar", "cuda_graph"),
    "model": ("name", "weights_path", "weights_files", "detach_points", "early_stages",
              "module_names", "parameter_names", "channels_last", "compile"),
    "optim": ("name",),
    "profiler": ("name",),
}

# Arguments the harness passes itself (job/build.py), so a node need not give them. The
# trainer node lists its own as null (config/schema.py TRAINER_CONTRACT refuses any other value).
SUPPLIED_ARGUMENTS = {"logger": ("save_dir", "purge_step"), "scheduler": ("optimizer",),
                      "optim": ("params",), "probes": ("recorder", "zero_grad"),
                      "profiler": ("run_dir", "recorder", "trace_dir"),
                      "trainer": ("callbacks", "logger", "plugins", "default_root_dir",
                                  "enable_progress_bar")}


def arguments(node, group: str) -> dict:
    """A `_target_` node as Hydra's instantiate takes it: plain values, resolved, without the
    harness's own keys (OWN_KEYS)."""
    from omegaconf import OmegaConf

    plain = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
    return {k: v for k, v in plain.items() if k not in OWN_KEYS.get(group, ())}


def shipped_targets() -> frozenset:
    """The `_target_`s of the shipped configs of TARGET_KINDS' groups: tested, so the
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
    """Every `_target_` node of the shipped configs of TARGET_KINDS' groups, as written
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
            found.update(freeze(n) for n in nodes(yaml.safe_load(path.read_text())))
    return frozenset(found)


def target_nodes(cfg) -> list[tuple[str, object, str]]:
    """(where, node, group) for every node the run instantiates: each callback, each logger,
    the scheduler's `make`, the trainer, model and optimizer, the probes and the profiler
    unless off."""
    nodes = [(f"{g}.{name}", node, g) for g in ("callbacks", "logger")
             for name, node in (cfg.get(g) or {}).items()]
    sched = cfg.get("scheduler") or {}
    if hasattr(sched, "get") and sched.get("make") is not None:
        nodes.append(("scheduler.make", sched.get("make"), "scheduler"))
    for group, off in (("trainer", None), ("model", None), ("optim", None),
                       ("probes", ("mode", "off")), ("profiler", ("name", "off"))):
        node = cfg.get(group)
        if hasattr(node, "get") and not (off and node.get(off[0]) == off[1]):
            nodes.append((group, node, group))
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
    trusted = shipped_targets() if trusted is None else trusted
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
        "patience": (lambda v: is_int(v) and v >= 0,
                     "an integer >= 0 (validations without improvement before stopping)"),
        "min_delta": (lambda v: is_num(v), "a finite number"),
    },
    "lightning.pytorch.callbacks.ModelCheckpoint": {
        "mode": (lambda v: v in ("min", "max"), "one of: min, max"),
        "every_n_train_steps": (lambda v: v is None or (is_int(v) and v >= 0),
                                "null or an integer >= 0 (optimizer steps between files)"),
        "every_n_epochs": (lambda v: v is None or (is_int(v) and v >= 0),
                           "null or an integer >= 0 (epochs between files)"),
        "save_top_k": (lambda v: is_int(v) and v >= -1,
                       "an integer >= -1 (-1: keep every file)"),
    },
}


def check_known_callback(where: str, node) -> None:
    """The ranges of CALLBACK_CHECKS for a callback whose `_target_` names one of those classes,
    torch-free (validate calls it; check_arguments covers subclasses and other spellings)."""
    target = node.get("_target_") if hasattr(node, "get") else None
    rules = CALLBACK_CHECKS.get(target) if isinstance(target, str) else None
    for key, (ok, valid) in (rules or {}).items():
        if key in node and not ok(node[key]):
            raise UserError(f"{where}.{key}={show_value(node[key])}: {target.rpartition('.')[2]}'s "
                            f"{key} must be {valid}")


def check_arguments(cfg, typed: list[str] | None = None) -> None:
    """Every argument a node of `target_nodes` passes to its class, checked against
    the class's own signature before anything runs: a name it does not take, a value that does
    not fit the parameter's type annotation, a required one missing, and the ranges of
    CALLBACK_CHECKS. Imports the classes (Lightning, torch): the CLI calls it once the torch-free
    checks have passed, and after check_targets has vetted every `_target_`. `typed`: the keys
    the command line set that the torch-free CHECKS do not; a node none of them reaches is as
    the shipped configs and presets give it (tested): its class is not imported for it."""
    cfg = resolved(cfg)
    horizon = (cfg.get("scheduler") or {}).get("horizon")
    for where, node, group in target_nodes(cfg):
        if not isinstance(node, dict) or not isinstance(node.get("_target_"), str):
            continue  # check_targets reports these
        if freeze(node) in _shipped_nodes():  # as shipped (and tested): no import needed
            continue
        if typed is not None and not any(key == where or key.startswith(where + ".")
                                         or where.startswith(key + ".") for key in typed):
            continue  # nothing typed reaches it: as the configs give it
        supplied = (*SUPPLIED_ARGUMENTS.get(group, ()), *([horizon] if group == "scheduler"
                                                         and horizon else []))
        args = {k: v for k, v in arguments(node, group).items()  # less the trainer node's
                if not (k in supplied and v is None)}          # placeholders for its own
        _check_node_arguments(where, node["_target_"], freeze(args), tuple(supplied))


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
        hints = typing.get_type_hints(cls.__init__ if isinstance(cls, type) else cls)
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
        value = thaw(value)
        hint = hints.get(key)
        if hint is not None and not fits(value, hint):
            raise UserError(f"{where}.{key}={show_value(value)}: {name}'s {key} must be "
                            f"{describe(hint)}")
        for path, rules in CALLBACK_CHECKS.items():
            if key in rules and _is_subclass(cls, path):
                ok, valid = rules[key]
                if not ok(value):
                    raise UserError(f"{where}.{key}={show_value(value)}: {name}'s {key} must "
                                    f"be {valid}")
    if "_args_" not in node:
        missing = [p for p, param in params.items() if param.default is inspect.Parameter.empty
                   and param.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                      inspect.Parameter.KEYWORD_ONLY)
                   and p not in node and p not in supplied]
        if missing:
            raise UserError(f"{where}: {name} needs {', '.join(missing)}; give "
                            f"{where}.{missing[0]}=...")


def _is_subclass(cls, path: str) -> bool:
    from hydra.utils import get_object

    try:
        return isinstance(cls, type) and issubclass(cls, get_object(path))
    except (ImportError, AttributeError):
        return False
