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

import io
import os
import pickle
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from torchvision.datasets import CIFAR10
from torchvision.datasets import cifar as tv_cifar
from torchvision.datasets.utils import extract_archive

from autograd_lab.config.resources import cannot_download, cifar10_url, unreachable
from autograd_lab.disk.files import atomic_write_bytes
from autograd_lab.errors import UserError, clip

ARCHIVE = "cifar-10-python.tar.gz"

CACHE_NAME = "autograd_lab_uint8.pt"

CLASSES = ["airplane", "automobile", "bird", "cat", "deer",
           "dog", "frog", "horse", "ship", "truck"]


def locate_cifar10(root: Path, download: bool) -> Path:
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


def cached_decode(root: Path, dataset_cls) -> dict[str, torch.Tensor]:
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
