"""Synthetic data written in CIFAR-10's on-disk format (pickled batches), so the offline path
exercises the same reader: class-dependent patterns plus noise, seeded."""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.datasets import CIFAR10

from autograd_lab.data.cifar import CLASSES
from autograd_lab.disk.files import atomic_write_bytes
from autograd_lab.errors import UserError


# ------------------------------------------------------------------ synthetic CIFAR-10
def make_synthetic(n: int, noise: float, seed: int, split_offset: int):
    """Deterministic, learnable images: each class is a smooth colour pattern, shifted by a few
    pixels, with a random brightness offset and pixel noise on top.

    The class patterns depend only on `seed`; shifts, noise and labels also on the split, so
    train and test are different draws of the same task. A SmallNet learns it well above chance
    within an epoch, but not instantly, so the seed's curves keep their shape.
    """
    g = torch.Generator().manual_seed(seed)
    patterns = torch.rand(10, 3, 4, 4, generator=g) * 2 - 1
    patterns = F.interpolate(patterns, size=(32, 32), mode="bilinear", align_corners=False)
    g.manual_seed(seed * 1_000_003 + split_offset)
    labels = torch.randint(0, 10, (n,), generator=g)
    shifts = torch.randint(-4, 5, (n, 2), generator=g)
    images = torch.empty(n, 3, 32, 32)
    for c in range(10):  # one roll per class and shift: at most 810 small ops, once per data set
        for (dy, dx) in shifts[labels == c].unique(dim=0).tolist():
            sel = (labels == c) & (shifts[:, 0] == dy) & (shifts[:, 1] == dx)
            images[sel] = patterns[c].roll((dy, dx), dims=(1, 2))
    brightness = 25 * torch.randn(n, 1, 1, 1, generator=g)
    images = 128 + 35 * images + brightness + noise * torch.randn(n, 3, 32, 32, generator=g)
    return images.round().clamp(0, 255).to(torch.uint8), labels


def write_synthetic(folder: Path, cfg) -> tuple[Path, type]:
    """Write (once) synthetic data in CIFAR-10's on-disk format; return (root, loader class)."""
    base = folder / CIFAR10.base_folder
    manifest = base / "manifest.json"  # JSON, not pickle: nothing in data.root runs as code
    if not manifest.is_file():
        try:
            base.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"data.root={folder}: cannot write the synthetic data set there "
                            f"({e.strerror}); set data.root to a writable folder") from None
        md5s = {}
        for split, n, offset in (("train", cfg.train_size, 1), ("test", cfg.test_size, 2)):
            x, y = make_synthetic(n, float(cfg.noise), cfg.synthetic_seed, offset)
            chunks = np.array_split(np.arange(n), 5) if split == "train" else [np.arange(n)]
            for i, idx in enumerate(chunks):
                name = f"data_batch_{i + 1}" if split == "train" else "test_batch"
                entry = {"batch_label": f"synthetic {split} {i + 1}",
                         "data": x[idx].reshape(len(idx), -1).numpy(),
                         "labels": y[idx].tolist(),
                         "filenames": [f"synthetic_{split}_{j}.png" for j in idx]}
                md5s[name] = _write_pickle(base / name, entry)
        md5s["batches.meta"] = _write_pickle(base / "batches.meta", {
            "label_names": CLASSES, "num_cases_per_batch": -(-cfg.train_size // 5),
            "num_vis": 3072})
        atomic_write_bytes(manifest, json.dumps(md5s, indent=1).encode())
    md5s = json.loads(manifest.read_text())
    # A CIFAR10 subclass with this data's md5s, as torchvision's CIFAR100 does for its files:
    # the same file list and integrity check read the synthetic files. The md5s come from the
    # folder, so they guard against damage, not against a planted file: read_batch_file does.
    cls = type("SyntheticCIFAR10", (CIFAR10,), {
        "train_list": [[f"data_batch_{i}", md5s[f"data_batch_{i}"]] for i in range(1, 6)],
        "test_list": [["test_batch", md5s["test_batch"]]],
        "meta": {"filename": "batches.meta", "key": "label_names", "md5": md5s["batches.meta"]},
    })
    return folder, cls


def _write_pickle(path: Path, obj) -> str:
    blob = pickle.dumps(obj, protocol=2)
    atomic_write_bytes(path, blob)
    return hashlib.md5(blob).hexdigest()
