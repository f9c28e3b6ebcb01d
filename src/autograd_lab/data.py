"""CIFAR-10 (real or synthetic) as resident uint8 tensors, batched by index slicing.

The seed decodes every image through PIL and ToTensor in DataLoader workers, every epoch. Here
torchvision's CIFAR-10 loader decodes the pickles once, the result is cached as one uint8 tensor
file, and batches are slices of that tensor, normalised on the device as the seed does
((x/255 - 0.5)/0.5). Augmentation draws its random numbers per epoch and works on whole batches.

Synthetic data is written in the real CIFAR-10 on-disk format (str-keyed pickles + batches.meta)
and read back by the same code as real CIFAR-10, md5 check included, so the offline path runs the
real loading code.

CIFAR-10's batch files are pickles, and a pickle can name any callable to run while it loads. They
are read by `read_batch_file`, a restricted unpickler that rebuilds only what the format holds
(numpy arrays of plain numbers, dicts, lists, strings, numbers), never through `pickle.load` (as
torchvision's CIFAR10 does): a planted file in a data folder is refused, and nothing in it runs.
Torchvision's file list, folder layout and md5 check are kept.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import sys
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torchvision.datasets import CIFAR10
from torchvision.datasets import cifar as tv_cifar
from torchvision.datasets.utils import extract_archive

from .config import UserError, cannot_download, cifar10_url, clip, unreachable
from .records import atomic_write_bytes

ARCHIVE = "cifar-10-python.tar.gz"
CACHE_NAME = "autograd_lab_uint8.pt"
CLASSES = ["airplane", "automobile", "bird", "cat", "deer",
           "dog", "frog", "horse", "ship", "truck"]


# ------------------------------------------------------------------ decoding and caching
def load_split_tensors(cfg) -> dict[str, torch.Tensor]:
    """Return {'train_x','train_y','test_x','test_y'}: uint8 NCHW images and int64 labels."""
    root = Path(cfg.root).expanduser()
    if cfg.name == "synthetic":
        folder, dataset_cls = write_synthetic(root / "synthetic" / _synthetic_key(cfg), cfg)
    else:
        folder, dataset_cls = _locate_cifar10(root, cfg.download), CIFAR10
    return _cached_decode(folder, dataset_cls)


def _locate_cifar10(root: Path, download: bool) -> Path:
    if (root / CIFAR10.base_folder).is_dir():
        return root
    archive = root / ARCHIVE
    downloaded = not archive.is_file() and download
    if downloaded:
        download_cifar10(root)
    if archive.is_file():
        if not tv_cifar.check_integrity(str(archive), CIFAR10.tgz_md5):
            if downloaded:  # not kept: the next run would take it for the user's copy
                archive.unlink()
                raise UserError(f"data=cifar10: the archive downloaded from {cifar10_url()} "
                                f"does not match torchvision's md5 (a damaged transfer, or a "
                                f"mirror serving another file): removed; run again, or put "
                                f"{ARCHIVE} in {root.resolve()}, or use data=synthetic")
            raise UserError(f"data.root={root}: {ARCHIVE} is truncated or corrupted (md5 "
                            f"mismatch); replace it with a complete copy")
        extract_archive(str(archive), str(root))
        return root
    raise UserError(f"data=cifar10: CIFAR-10 not found in data.root={root.resolve()}; put "
                    f"{ARCHIVE} (or its extracted {CIFAR10.base_folder}/) there, set "
                    f"data.download=true, or use data=synthetic (runs offline)")


DOWNLOAD_TIMEOUT_S = 30.0  # a stalled connection fails after this long instead of hanging


def download_cifar10(root: Path) -> None:
    """Fetch cifar-10-python.tar.gz into `root` with torchvision's download utility, as the
    seed's CIFAR10(download=True) does, bounded in time: the host is probed first (a few
    seconds), sockets time out (torchvision's urlopen takes no timeout, so the default one is
    set for the call), and the file is written under a temporary name and renamed when whole.
    The caller then checks its md5, extracts it and reads it with the safe reader, as a copied
    archive. Failing, one line: the URL, the folder, the reason."""
    import socket

    from torchvision.datasets.utils import download_url

    url = cifar10_url()
    why = unreachable(url)
    if why is not None:
        raise UserError(cannot_download(root, url, why))
    part = root / f".{ARCHIVE}.part"
    print(f"autograd-lab: CIFAR-10 is not in data.root={root.resolve()}: downloading {url} "
          f"(170 MB; data.download=false turns this off)", file=sys.stderr, flush=True)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        root.mkdir(parents=True, exist_ok=True)
        part.unlink(missing_ok=True)  # download_url keeps a file that is already there
        download_url(url, str(root), part.name)
        os.replace(part, root / ARCHIVE)
    except Exception as e:  # HTTP errors, time-outs, a full disk: one line, no traceback
        part.unlink(missing_ok=True)
        raise UserError(cannot_download(root, url, f"{type(e).__name__}: {e}")) from None
    finally:
        socket.setdefaulttimeout(previous)


def _source_signature(folder: Path, dataset_cls) -> str:
    files = [n for n, _ in dataset_cls.train_list + dataset_cls.test_list]
    parts = []
    for name in files + [dataset_cls.meta["filename"]]:
        st = (folder / dataset_cls.base_folder / name).stat()
        parts.append(f"{name}:{st.st_size}:{st.st_mtime_ns}")
    return "|".join(parts)


def _cached_decode(root: Path, dataset_cls) -> dict[str, torch.Tensor]:
    cache = root / dataset_cls.base_folder / CACHE_NAME
    try:
        signature = _source_signature(root, dataset_cls)
    except FileNotFoundError as e:
        raise UserError(f"data.root={root}: {Path(e.filename).name} is missing from "
                        f"{dataset_cls.base_folder}/; restore it or delete the folder") from None
    if cache.is_file():
        try:
            blob = torch.load(cache, weights_only=True)
            if blob.get("signature") == signature:
                return {k: v for k, v in blob.items() if k != "signature"}
        except Exception as e:  # a torn or corrupted cache is rebuilt, not trusted
            warnings.warn(f"{cache}: unreadable cache ({type(e).__name__}); decoding again",
                          stacklevel=2)
    tensors = {}
    for split, train in (("train", True), ("test", False)):
        x, y = read_split(root, dataset_cls, train)
        tensors[f"{split}_x"] = torch.from_numpy(x)
        tensors[f"{split}_y"] = torch.from_numpy(y)
    try:
        buf = io.BytesIO()
        torch.save({**tensors, "signature": signature}, buf)
        atomic_write_bytes(cache, buf.getvalue())
    except OSError as e:  # a read-only data folder still trains, just without the cache
        warnings.warn(f"{cache}: cannot write the decode cache ({e.strerror})", stacklevel=2)
    return tensors


# ------------------------------------------------------------------ reading the batch files
class RefusedFile(UserError):
    """A data file that is not what the CIFAR-10 format holds; nothing in it was run."""


def _latin1_encode(text, encoding="latin1"):
    """`_codecs.encode`, as Python 3 writes bytes into a protocol-2 pickle, for latin-1 only."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise pickle.UnpicklingError(f"_codecs.encode with {encoding!r}")
    return text.encode("latin1")


def _numpy_callables() -> dict[tuple[str, str], object]:
    from numpy import _core

    reconstruct, frombuffer = _core.multiarray._reconstruct, _core.numeric._frombuffer
    allowed = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
               ("_codecs", "encode"): _latin1_encode}
    for package in ("numpy.core", "numpy._core"):  # numpy 1 writes the first, numpy 2 the second
        allowed[(f"{package}.multiarray", "_reconstruct")] = reconstruct
        allowed[(f"{package}.numeric", "_frombuffer")] = frombuffer
    return allowed


class _BatchUnpickler(pickle.Unpickler):
    """Rebuilds numpy arrays, dicts, lists, strings and numbers, and nothing else: any other
    global a pickle names (os.system, builtins.eval, ...) is refused before it is looked up."""

    allowed = _numpy_callables()

    def find_class(self, module, name):
        try:
            return self.allowed[(module, name)]
        except KeyError:
            raise RefusedFile(f"{module}.{name}") from None

    def persistent_load(self, pid):
        raise RefusedFile("a persistent id")


def read_batch_file(path: Path) -> dict:
    """One CIFAR-format batch file, read without running anything it contains."""
    try:
        with open(path, "rb") as f:
            entry = _BatchUnpickler(f, encoding="latin1").load()
    except RefusedFile as e:
        raise RefusedFile(f"data file {path} is not a CIFAR-10 batch file: it asks to run "
                          f"{e} while loading; refused, nothing in it was run. Replace it with "
                          f"the original file") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError,
            AttributeError) as e:
        raise UserError(f"data file {path} cannot be read ({type(e).__name__}: "
                        f"{clip(str(e), 80)}); it is truncated or corrupted: replace it") from None
    if not isinstance(entry, dict):
        raise UserError(f"data file {path} is not a CIFAR-10 batch file (holds a "
                        f"{type(entry).__name__}, not a dict); replace it")
    for value in entry.values():  # object arrays would hold arbitrary Python objects
        if isinstance(value, np.ndarray) and value.dtype.hasobject:
            raise UserError(f"data file {path}: an array of Python objects; replace it")
    return entry


def read_split(root: Path, dataset_cls, train: bool) -> tuple[np.ndarray, np.ndarray]:
    """The train or test split of a CIFAR-10-format folder: uint8 NCHW images, int64 labels.

    torchvision's file list and md5 check (`dataset_cls`: CIFAR10 or a subclass with other
    md5s), the batch files read by `read_batch_file`, the labels checked against the images."""
    folder = root / dataset_cls.base_folder
    files = [*dataset_cls.train_list] if train else [*dataset_cls.test_list]
    for name, md5 in [*files, (dataset_cls.meta["filename"], dataset_cls.meta["md5"])]:
        if not tv_cifar.check_integrity(os.path.join(folder, name), md5):
            raise UserError(f"data.root={root}: {dataset_cls.base_folder}/{name} is truncated "
                            f"or corrupted (md5 mismatch); replace the files or the archive")
    meta = read_batch_file(folder / dataset_cls.meta["filename"])
    classes = meta.get(dataset_cls.meta["key"])
    if not (isinstance(classes, list) and classes):
        raise UserError(f"data file {folder / dataset_cls.meta['filename']}: no "
                        f"{dataset_cls.meta['key']!r} list; replace it")
    images, labels = [], []
    for name, _ in files:
        path = folder / name
        entry = read_batch_file(path)
        data, y = entry.get("data"), entry.get("labels", entry.get("fine_labels"))
        if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2
                and data.shape[1] == 3 * 32 * 32):
            raise UserError(f"data file {path}: 'data' must be a uint8 array of shape (N, 3072)"
                            f" (got {getattr(data, 'dtype', type(data).__name__)} "
                            f"{getattr(data, 'shape', '')}); replace it")
        if not (isinstance(y, list) and all(type(v) is int for v in y)):
            raise UserError(f"data file {path}: 'labels' must be a list of integers; replace it")
        if len(y) != len(data):
            raise UserError(f"data file {path}: {len(data)} images but {len(y)} labels; "
                            f"replace it")
        bad = next((v for v in y if not 0 <= v < len(classes)), None)
        if bad is not None:
            raise UserError(f"data file {path}: label {bad} is outside 0..{len(classes) - 1} "
                            f"(the {len(classes)} classes of batches.meta); replace it")
        images.append(data)
        labels.extend(y)
    x = np.vstack(images).reshape(-1, 3, 32, 32)  # rows are 1024 red, green, blue values
    y = np.asarray(labels, dtype=np.int64)
    return x, y


# ------------------------------------------------------------------ synthetic CIFAR-10
def _synthetic_key(cfg) -> str:
    from .config import synthetic_key  # one rule: the preflight's memory check finds it too

    return synthetic_key(cfg)


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


# ------------------------------------------------------------------ batches
def normalize(x: torch.Tensor) -> torch.Tensor:
    """uint8 images -> the seed's ToTensor + Normalize((0.5,)*3, (0.5,)*3)."""
    return x.float().div_(255).sub_(0.5).div_(0.5)


def flip_crop(x: torch.Tensor, flip: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor,
              pad: int = 4) -> torch.Tensor:
    """Random horizontal flip and reflect-padded crop for a whole batch, in two tensor ops."""
    x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    n, c, h, w = x.shape
    rows = (dy.view(n, 1) + torch.arange(h, device=x.device)).view(n, 1, h, 1)
    cols = (dx.view(n, 1) + torch.arange(w, device=x.device)).view(n, 1, 1, w)
    batch = torch.arange(n, device=x.device).view(n, 1, 1, 1)
    chan = torch.arange(c, device=x.device).view(1, c, 1, 1)
    return padded[batch, chan, rows, cols]


class ResidentBatches:
    """An epoch of (images, labels) batches sliced from resident tensors.

    The order of epoch e depends only on (seed, e), so any epoch, and any position in it, can be
    reproduced. Lightning calls `sampler.set_epoch(e)` before each epoch (as it does for a
    DistributedSampler); `sampler` is this object.

    It is a stateful loader in Lightning's sense (`state_dict` / `load_state_dict`): Lightning
    saves its state with the fit loop's in every checkpoint and hands it back on resume, so a run
    stopped after batch p of epoch e continues at batch p. Lightning does not prefetch from a
    loader with a length, so at a step's end the batches yielded are the steps done.
    """

    def __init__(self, x, y, batch_size: int, shuffle: bool, seed: int, augment: bool = False,
                 rank: int = 0, world: int = 1):
        self.x, self.y = x, y
        self.batch_size, self.shuffle, self.seed, self.augment = batch_size, shuffle, seed, augment
        self.epoch = 0
        self.position = 0  # batches of this epoch yielded
        self.resume_at: tuple[int, int] | None = None  # (epoch, batch) from a checkpoint
        # DDP: rank r takes every world-th position of the epoch's order, the same count on every
        # rank, so step k's batches across ranks are positions [k*b*world, (k+1)*b*world): the
        # single-process run's batch of b*world, split.
        self.rank, self.world = rank, world
        self.sampler, self.batch_sampler = self, None  # what Lightning looks for on a loader

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return -(-(len(self.x) // self.world) // self.batch_size)

    # -- Lightning's stateful-loader protocol
    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.resume_at = (state["epoch"], state["position"])

    def _epoch_plan(self) -> dict:
        n, device = len(self.x), self.x.device
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        plan = {"order": torch.randperm(n, generator=g).to(device) if self.shuffle else None,
                "aug": None, "shard": None}
        if self.augment:
            plan["aug"] = ((torch.rand(n, generator=g) < 0.5).to(device),
                           torch.randint(0, 9, (2, n), generator=g).to(device))
        if self.world > 1:  # positions of this rank's share of the epoch
            plan["shard"] = torch.arange(self.rank, n - n % self.world, self.world, device=device)
        return plan

    def _start(self) -> int:
        start = 0
        if self.resume_at is not None:  # read here: Lightning calls set_epoch before the pass
            if self.resume_at[0] == self.epoch:
                start = self.resume_at[1]
            self.resume_at = None
        return start

    def take(self, plan: dict, lo: int, hi: int):
        """Images lo..hi-1 of this epoch's (shard of the) order: x, y and augmentation draws."""
        shard, order = plan["shard"], plan["order"]
        pos = slice(lo, hi) if shard is None else shard[lo:hi]
        idx = pos if order is None else order[pos]
        aug = None
        if plan["aug"] is not None:
            flip, shift = plan["aug"]
            aug = (flip[pos], shift[0, pos], shift[1, pos])
        return self.x[idx], self.y[idx], aug

    def __iter__(self):
        plan, b = self._epoch_plan(), self.batch_size
        for i in range(self._start(), len(self)):
            x, y, aug = self.take(plan, i * b, (i + 1) * b)
            self.position = i + 1
            yield (x, y) if aug is None else (x, y, aug)


class CIFARDataModule(L.LightningDataModule):
    """Train on the train split, validate on the test split, both resident in memory."""

    def __init__(self, cfg, seed: int, tensors: dict[str, torch.Tensor] | None = None):
        super().__init__()
        self.cfg, self.seed = cfg, seed
        self.tensors = tensors

    def setup(self, stage: str | None = None) -> None:
        if self.tensors is None:
            self.tensors = load_split_tensors(self.cfg)
        device = self.trainer.strategy.root_device if self.trainer else torch.device("cpu")
        if device.type != "cpu":  # resident on the accelerator: no per-batch host copies
            self.tensors = {k: v.to(device) for k, v in self.tensors.items()}

    def train_dataloader(self) -> ResidentBatches:
        t, n = self.tensors, self.cfg.get("subset") or None
        return ResidentBatches(t["train_x"][:n], t["train_y"][:n], self.cfg.batch_size,
                               self.cfg.shuffle, self.seed,
                               augment=self.cfg.augment == "flip_crop", **self._shard())

    def val_dataloader(self) -> ResidentBatches:
        t = self.tensors
        # Each rank validates its share and the module sums across ranks. Shares are equal
        # (the last len % world examples are left out under DDP), so every rank runs the same
        # number of batches and meets the others in the reduce.
        shard = self._shard()
        r, w = shard["rank"], shard["world"]
        n = len(t["test_x"]) - len(t["test_x"]) % w
        return ResidentBatches(t["test_x"][r:n:w], t["test_y"][r:n:w], self.cfg.val_batch_size,
                               False, self.seed)

    def _shard(self) -> dict:
        trainer = self.trainer
        return {"rank": trainer.global_rank if trainer else 0,
                "world": trainer.world_size if trainer else 1}

    def transfer_batch_to_device(self, batch, device, dataloader_idx: int):
        # Batches are already where the resident tensors live (setup moved them): skip
        # Lightning's generic collection walk, which costs ~0.1 ms a step.
        if all(t.device == device for t in batch[:2]):
            return batch
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """Normalise (and augment) a batch on its device: (x, y) for the step."""
        with self.trainer.lightning_module.phase("data"):  # a profiler range while profiling
            return _prepare(batch[0], batch[2] if len(batch) == 3 else None), batch[1]


def _prepare(x: torch.Tensor, aug) -> torch.Tensor:
    x = normalize(x)
    return x if aug is None else flip_crop(x, *aug)
