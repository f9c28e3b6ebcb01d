"""Pairs of runs that differ in one key: for a swept key, the runs that agree on every other
result-relevant key, the seed included (so they share the initial weights and the data order),
each variant run against the run of the reference value.

The reference value of a key is its value in the default config (what `autograd-lab train`
runs with no overrides: train.zero_grad=true, model.activation=relu, variant=none,
train.freeze=[], model=smallnet, ...) when one of the runs has it; otherwise the first of the
runs' values in sorted order (numbers numerically, anything else as typed). So `relu` is the
reference of `custom_relu`, zero_grad `true` that of `false`, variant `none` that of
`frozen_backbone`, and the smallest learning rate that of the larger ones of a learning-rate
sweep (the default 0.01 not being among them).
"""

from __future__ import annotations

import functools

import pandas as pd

from autograd_lab.config.compose import compose
from autograd_lab.config.keys import GROUPS, flatten, is_result_key
from autograd_lab.errors import UserError
from autograd_lab.sweep.runs import BAND_KEY, _same_partition
from autograd_lab.text import as_typed

# the runs a pair may be made of: a result (or the steps recorded before a kill)
PAIRED = ("completed", "diverged", "interrupted")

COLUMNS = ["key", "reference_value", "variant_value", "reference_run", "variant_run", "seed"]


@functools.lru_cache(maxsize=1)
def default_values() -> dict:
    """{dotted key or config group: its default value, as typed}: the config `autograd-lab
    train` composes with no overrides, and its group choices (variant=none, model=smallnet).
    {} when it cannot be composed (then every reference is the first value in sorted order)."""
    from omegaconf import OmegaConf

    try:
        cfg = compose([], return_hydra_config=True)
        choices = {k: v for k, v in OmegaConf.to_container(cfg.hydra.runtime.choices).items()
                   if k in GROUPS}
        cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
        try:
            config = OmegaConf.to_container(cfg, resolve=True)
        except Exception:  # an interpolation only the running app resolves
            config = OmegaConf.to_container(cfg)
    except Exception:  # a broken conf/ or a Hydra without the compose API: no defaults
        return {}
    flat = flatten(config, lambda v: str(v) if isinstance(v, list) else v)  # as load_runs
    return {k: as_typed(v) for k, v in {**flat, **choices}.items()}


def _order(value: str):
    """Sort order of a key's values as typed: numbers numerically before any text."""
    try:
        return (0, float(value), "")
    except ValueError:
        return (1, 0.0, value)


def reference_value(key: str, values) -> str:
    """The reference among a key's values (as typed): the default config's value when one of
    them, else the first in sorted order. See the module's docstring."""
    values = sorted({as_typed(v) for v in values}, key=_order)
    default = default_values().get(key)
    return default if default in values else values[0]


def _varying(runs: pd.DataFrame) -> list[str]:
    """The config keys whose value differs between `runs` (swept keys, and those a group choice
    sets with them, like train.freeze with variant)."""
    results = set(runs.attrs.get("results", []))
    return [c for c in runs.columns
            if (c in GROUPS or ("." in c and c not in results)) and is_result_key(c)
            and c != BAND_KEY and runs[c].astype(str).nunique() > 1]


def pair_runs(runs: pd.DataFrame, key: str | None = None) -> pd.DataFrame:
    """One row per (variant run, reference run) pair: the runs that differ in `key` (each swept
    key when None) and agree on every other swept key and the seed (and the study). Columns:
    key, reference_value, variant_value, reference_run, variant_run, seed, then the other
    swept keys' values (as typed). Completed, diverged and interrupted runs only. A `key` that
    does not vary between the runs is a UserError naming the swept keys."""
    swept = list(runs.attrs.get("swept", []))
    usable = runs[runs.status.isin(PAIRED)] if "status" in runs else runs.iloc[:0]
    varying = _varying(usable) if len(usable) else []
    if key is not None and key not in swept and key not in varying:
        raise UserError(f"{key}: not a swept key of these runs; swept keys are: "
                        f"{', '.join(swept) or '(none)'}")
    keys = [key] if key is not None else [k for k in swept if k != BAND_KEY]
    frames = [_pairs_of(usable, k, swept) for k in keys if k in usable]
    others = sorted({c for f in frames for c in f.columns if c not in COLUMNS})
    frames = [f for f in frames if len(f)]
    if not frames:
        return pd.DataFrame(columns=COLUMNS + others)
    return pd.concat(frames, ignore_index=True).reindex(columns=COLUMNS + others)


def _pairs_of(runs: pd.DataFrame, key: str, swept: list[str]) -> pd.DataFrame:
    """pair_runs for one key."""
    text = runs[key].map(as_typed)
    # the other keys a pair agrees on; a key that varies exactly with `key` (variant and the
    # train.freeze it sets) is the same difference, not another one
    others = [k for k in swept if k != key and k != BAND_KEY and k in runs
              and not _same_partition(runs[k].astype(str), runs[key].astype(str))]
    match = [*others, *([BAND_KEY] if BAND_KEY in runs else []),
             *(["study"] if "study" in runs else [])]
    if text.nunique() < 2:
        return pd.DataFrame(columns=COLUMNS + others)
    reference = reference_value(key, text.unique())
    frame = pd.DataFrame({k: runs[k].map(as_typed) for k in match}, index=runs.index)
    frame["_value"], frame["_run"] = text, runs.run.astype(str)
    refs = frame[frame._value == reference].sort_values("_run").drop_duplicates(match)
    variants = frame[frame._value != reference]
    merged = variants.merge(refs[[*match, "_run", "_value"]], on=match, how="inner",
                            suffixes=("", "_ref")) if match else \
        variants.merge(refs[["_run", "_value"]], how="cross", suffixes=("", "_ref"))
    out = pd.DataFrame({"key": key, "reference_value": merged["_value_ref"],
                        "variant_value": merged["_value"], "reference_run": merged["_run_ref"],
                        "variant_run": merged["_run"],
                        "seed": merged[BAND_KEY] if BAND_KEY in merged else None})
    for k in others:
        out[k] = merged[k]
    return out.sort_values(["variant_value", *others, "seed", "variant_run"],
                           key=lambda s: s.map(_order) if s.name != "variant_run" else s,
                           ignore_index=True)
