"""The sweep's tables: one row per group of runs, results and cost, with short labels that
name only the keys that vary."""

from __future__ import annotations

import pandas as pd

from autograd_lab.sweep.runs import LABELS
from autograd_lab.text import as_typed, fmt_number

# The summary tables: (column, header, scale). Bytes are shown in MiB.
RESULTS = (("train_loss", "train loss", 1.0), ("best_train_loss", "best train loss", 1.0),
           ("val_loss", "val loss", 1.0), ("val_acc", "val acc", 1.0))

COST = (("seconds_per_step", "s/step (median)", 1.0), ("images_per_s", "images/s", 1.0),
        ("memory.saved_for_backward_bytes", "saved for backward MiB", 2**-20),
        ("memory.grad_bytes", ".grad MiB", 2**-20),
        ("memory.optimizer_state_bytes", "optimizer state MiB", 2**-20),
        ("memory.val_saved_bytes", "val graph MiB", 2**-20),
        ("trainable_params", "trainable params", 1.0),
        ("peak_cuda_mib", "peak CUDA MiB", 1.0),
        ("profiler.breakdown_ms.forward", "forward ms", 1.0),
        ("profiler.breakdown_ms.backward", "backward ms", 1.0),
        ("profiler.breakdown_ms.optimizer", "optimizer ms", 1.0))


def _short(key: str, keys: list[str]) -> str:
    """A key's last part (train.zero_grad -> zero_grad) unless two keys would then read the
    same."""
    last = key.rsplit(".", 1)[-1]
    return last if sum(k.rsplit(".", 1)[-1] == last for k in keys) == 1 else key


def group_table(runs: pd.DataFrame, by: list[str], columns=RESULTS + COST) -> pd.DataFrame:
    """Per group of runs (the keys in `by`, seeds pooled): n, and each column's mean, with
    ± std where n > 1; completed runs only (the others are listed on their own). One pandas
    groupby for all groups: thousands of groups take a second."""
    import numpy as np

    done = runs[runs.status == "completed"]
    cols = [(c, h, k) for c, h, k in columns if c in done and done[c].notna().any()]
    keys = [k for k in by if k != "seed"]
    values = pd.DataFrame({c: pd.to_numeric(done[c], errors="coerce").astype(float) * k
                           for c, _, k in cols}, index=done.index)
    grouped = values.groupby([done[k].map(as_typed) for k in keys] if keys
                             else np.zeros(len(done), dtype=int), sort=True)
    size, mean, std, count = grouped.size(), grouped.mean(), grouped.std(), grouped.count()
    rows = []
    for i, key in enumerate(size.index):
        key = key if isinstance(key, tuple) else (key,)
        row = {_short(k, keys): v for k, v in zip(keys, key, strict=True)} if keys else {}
        row["n"] = int(size.iloc[i])
        for col, header, _ in cols:
            text = fmt_number(mean[col].iloc[i])
            if count[col].iloc[i] > 1 and std[col].iloc[i] > 0:  # a spread only where there is
                text += f" ± {fmt_number(std[col].iloc[i], digits=2)}"
            row[header] = text
        rows.append(row)
    return pd.DataFrame(rows)


def group_label(study, key_values: dict) -> str:
    if study in LABELS:
        key, names = LABELS[study]
        value = key_values.get(key)
        value = {"True": True, "False": False, "true": True, "false": False}.get(value, value)
        if value in names:
            rest = {k: v for k, v in key_values.items() if k != key}
            return names[value] + (f" ({key_values_text(rest)})" if rest else "")
    return key_values_text(key_values) or "all runs"


def key_values_text(key_values: dict) -> str:
    keys = list(key_values)
    return ", ".join(f"{_short(k, keys)}={as_typed(v)}" for k, v in key_values.items())


def study_of(runs: pd.DataFrame) -> pd.Series:
    return runs["study"].fillna("runs").astype(str) if "study" in runs else \
        pd.Series("runs", index=runs.index)


def data_name(runs: pd.DataFrame) -> str:
    names = sorted(runs["data.name"].dropna().astype(str).unique()) if "data.name" in runs \
        else []
    return ", ".join(names) or "unknown data"
