"""Every check of a command line before anything runs: overrides parsed by Hydra's own parser,
each job of a sweep composed and validated, files and resources checked, keys added under
closed nodes refused, duplicate runs named. Torch-free."""

from __future__ import annotations

import copy
import functools
import itertools
import os
from pathlib import Path

from autograd_lab.config.compose import (
    _compose,
    _copy_tree,
    _first_choice,
    _is_hydra_override,
    _set_dotted,
)
from autograd_lab.config.devices import check_devices
from autograd_lab.config.keys import (
    CONF_DIR,
    MISSING,
    NON_RESULT_KEYS,
    _unresolvable,
    flatten,
    get_dotted,
    identity_key,
    is_result_key,
    path_safe,
    resolved,
    settable_keys,
)
from autograd_lab.config.resources import data_problems, memory_problems
from autograd_lab.config.schema import CHECKS, validate
from autograd_lab.config.stacking import is_stacked, refusal, stack_overrides
from autograd_lab.config.targets import check_arguments, check_targets, shipped_targets
from autograd_lab.errors import UserError, did_you_mean, first_line


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
    problems += data_problems(cfg)
    problems += memory_problems(cfg)
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
        node = get_dotted(cfg, parent)
        if node is MISSING or not hasattr(node, "keys"):
            continue  # a node that does not exist: Hydra's own message says so
        keys = settable_keys(node)
        if leaf in keys:  # `+` adds a key; this one is there already: set it
            raise UserError(f"+{o.key_or_group}: {parent} has this key already; set it "
                            f"without the +: {o.input_line.lstrip('+')}")
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

    overrides = stack_overrides(overrides, multirun)
    parser = OverridesParser.create()
    parsed = []
    for text in overrides:
        if _is_hydra_override(text):
            continue
        try:
            parsed.append(parser.parse_override(text))
        except HydraException as e:
            raise UserError(f"{text}: not a valid override ({first_line(str(e))})") from None

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
        shipped = shipped_targets()
        problems: list[str] = []  # every problem of every job, each once, reported together
        jobs = []  # every job, checked before the first one starts
        stacked = multirun and is_stacked(overrides)
        for job in sweep_jobs(compose, fixed, sweeps, parser, composed=(base, cfg)):
            try:
                job = resolved(job)
            except UserError as e:
                problems.append(str(e))
                continue
            try:
                validate(job)
                if stacked and (why := refusal(job)):
                    problems.append(why)
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
                    check_arguments(job, typed=[o.key_or_group for o in parsed
                                                if o.key_or_group not in CHECKS])
                except UserError as e:
                    problems.append(str(e))
    GlobalHydra.instance().clear()
    if problems:
        raise UserError("\n".join(dict.fromkeys(problems)))
    return plan


def duplicate_runs(jobs: list[dict], sweeps: dict) -> list[str]:
    """One line if two jobs of a sweep are the same run (config.keys.identity_key): they would land
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
        differ = sorted(k for k in {*first, *other} if first.get(k, MISSING) != other.get(
            k, MISSING))
        if differ:
            shown = sweeps[differ[0]].input_line if differ[0] in sweeps else differ[0]
            return [f"{shown}: {', '.join(differ)} does not change a run's results "
                    f"(config.keys.NON_RESULT_KEYS), so these jobs are one run and would share one "
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


def sweep_jobs(compose, fixed: list[str], sweeps: dict, parser, composed=None):
    """Every job of a sweep as Hydra would compose it, quickly: one compose per combination of
    the swept config groups (and of swept +/~ overrides, which change the config's shape), and
    for each of those every combination of the swept plain values set on that config, as
    Hydra's own ConfigLoader sets a value override (OmegaConf.update, merge=True). A 1,000-job
    sweep of values costs one compose, not 1,000, and none when `composed` (overrides, config
    with its hydra node) already is that config. Yields each job's config, resolved (plain)."""
    from omegaconf import OmegaConf, open_dict

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
        overrides = fixed + list(shape_combo) + first
        if composed is not None and sorted(overrides) == sorted(composed[0]):
            cfg = copy.deepcopy(composed[1])  # less its hydra node, as Hydra's run_job does
            with open_dict(cfg):
                del cfg["hydra"]
        else:
            cfg = _compose(compose, overrides, return_hydra=False)
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


# True while `autograd-lab train` runs the Hydra app it has checked (check_overrides): the
# app's own preflight (sweep.callbacks.PreflightCallback, `python -m autograd_lab.train`) skips
CHECKED_BY_CLI = False
