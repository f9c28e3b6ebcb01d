"""Data loading through the real torchvision CIFAR-10 code, on files in the real on-disk format."""

from __future__ import annotations

import pickle
import tarfile
import warnings
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from conftest import make_cfg

from autograd_lab.data.cifar import CACHE_NAME
from autograd_lab.data.loader import ResidentBatches, flip_crop, load_split_tensors
from autograd_lab.errors import UserError


def write_fake_cifar10(root: Path, per_batch: int = 20, seed: int = 0) -> dict:
    """CIFAR-10's real layout and file names, as torchvision's own tests fake it: str-keyed
    pickles with 'data' (N, 3072) uint8 and 'labels'. Returns the arrays written."""
    rng = np.random.default_rng(seed)
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    written = {"train": [], "test": []}
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, per_batch).tolist()
        with open(base / name, "wb") as f:
            pickle.dump({"data": data, "labels": labels, "batch_label": name}, f)
        written["test" if name == "test_batch" else "train"].append((data, labels))
    with open(base / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)
    return written


@pytest.fixture
def no_md5():
    """Fake files cannot match CIFAR-10's md5s: patch the check where torchvision looks it up."""
    with mock.patch("torchvision.datasets.cifar.check_integrity", return_value=True):
        yield


def _data_cfg(root: Path, *overrides: str):
    return make_cfg("data=cifar10", f"data.root={root}", *overrides, small=False).data


def test_real_cifar10_format_is_decoded_once_into_the_cache(tmp_path, no_md5):
    written = write_fake_cifar10(tmp_path)
    tensors = load_split_tensors(_data_cfg(tmp_path))
    data, labels = written["train"][0]
    # CIFAR's row layout is 1024 red, 1024 green, 1024 blue values: NCHW after reshape
    assert torch.equal(tensors["train_x"][:20], torch.from_numpy(data.reshape(20, 3, 32, 32)))
    assert tensors["train_y"][:20].tolist() == labels
    assert tensors["train_x"].shape == (100, 3, 32, 32) and tensors["train_x"].dtype == torch.uint8
    assert tensors["test_x"].shape == (20, 3, 32, 32)
    assert (tmp_path / "cifar-10-batches-py" / CACHE_NAME).is_file()
    decoded_again = AssertionError("decoded again")
    with mock.patch("autograd_lab.data.cifar.read_split", side_effect=decoded_again):
        again = load_split_tensors(_data_cfg(tmp_path))
    assert torch.equal(again["train_x"], tensors["train_x"])


def test_the_archive_alone_is_enough(tmp_path, no_md5):
    src = tmp_path / "src"
    written = write_fake_cifar10(src)
    root = tmp_path / "root"
    root.mkdir()
    with tarfile.open(root / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(src / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    tensors = load_split_tensors(_data_cfg(root))
    assert tensors["test_y"].tolist() == written["test"][0][1]


def test_a_corrupted_cache_is_rebuilt_with_a_warning(tmp_path, no_md5):
    write_fake_cifar10(tmp_path)
    first = load_split_tensors(_data_cfg(tmp_path))
    (tmp_path / "cifar-10-batches-py" / CACHE_NAME).write_bytes(b"not a tensor file")
    with pytest.warns(UserWarning, match="unreadable cache"):
        second = load_split_tensors(_data_cfg(tmp_path))
    assert torch.equal(first["train_x"], second["train_x"])


def test_missing_cifar10_says_where_to_put_it_and_mentions_synthetic(tmp_path):
    with pytest.raises(UserError) as err:
        load_split_tensors(_data_cfg(tmp_path))
    text = str(err.value)
    assert "cifar-10-python.tar.gz" in text and str(tmp_path) in text and "data=synthetic" in text


def test_a_truncated_batch_file_is_one_clear_error(tmp_path, no_md5):
    write_fake_cifar10(tmp_path)
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    batch.write_bytes(batch.read_bytes()[:500])
    with pytest.raises(UserError, match="cannot be read|corrupted"):
        load_split_tensors(_data_cfg(tmp_path))


def test_synthetic_data_is_checked_by_torchvisions_md5s(tmp_path):
    cfg = make_cfg(f"data.root={tmp_path}").data
    first = load_split_tensors(cfg)
    assert first["train_x"].shape == (512, 3, 32, 32) and first["test_x"].shape == (256, 3, 32, 32)
    assert set(first["train_y"].unique().tolist()) == set(range(10))
    batch = next((tmp_path / "synthetic").glob("*/cifar-10-batches-py/data_batch_2"))
    blob = bytearray(batch.read_bytes())
    blob[-10] ^= 0xFF  # one flipped byte: same size, different md5
    batch.write_bytes(bytes(blob))
    with pytest.raises(UserError, match="truncated or corrupted"):
        load_split_tensors(cfg)


class _RunsCode:
    """A pickle that runs a shell command when loaded: what a planted data file would hold."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def _plant(path: Path, obj) -> str:
    """Write `obj` as a pickle at `path`; return its md5 (what a forger puts in the manifest)."""
    import hashlib

    blob = pickle.dumps(obj, protocol=2)
    path.write_bytes(blob)
    return hashlib.md5(blob).hexdigest()


def test_a_planted_pickle_with_a_matching_manifest_runs_nothing(tmp_path, monkeypatch, capsys):
    """The attack: replace batches.meta in a synthetic folder with a code-running pickle and
    update its md5 in manifest.json. The CLI (its entry point, in this process) refuses the file
    in one line; the command in it never ran (its marker file does not exist)."""
    import json

    from conftest import in_process

    marker = tmp_path / "ran"
    args = ["train", "data=synthetic", f"data.root={tmp_path / 'data'}", "data.train_size=64",
            "data.test_size=32", "trainer.max_steps=2", "trainer.progress_bar=false",
            f"hydra.run.dir={tmp_path / 'run'}"]
    first = in_process(args, tmp_path, monkeypatch, capsys)
    assert first.returncode == 0, first.stderr[-2000:]
    base = next((tmp_path / "data" / "synthetic").glob("*/cifar-10-batches-py"))
    manifest = json.loads((base / "manifest.json").read_text())
    manifest["batches.meta"] = _plant(base / "batches.meta",
                                      {"label_names": _RunsCode(marker)})
    (base / "manifest.json").write_text(json.dumps(manifest))
    second = in_process([*args, "resume=false"], tmp_path, monkeypatch, capsys)
    assert not marker.exists(), "the planted pickle ran its command"
    assert second.returncode == 2, second.stderr[-2000:]
    lines = [ln for ln in second.stderr.splitlines() if ln.strip()]
    assert lines[0].endswith(": starting"), second.stderr  # the run's start line, then
    lines = lines[1:]  # one line: what was refused
    assert len(lines) == 1 and "Traceback" not in second.stderr, second.stderr
    assert "batches.meta" in lines[0] and "refused" in lines[0] and "nothing in it was run" \
        in lines[0] and "posix.system" in lines[0], lines[0]


@pytest.mark.parametrize("name", ["data_batch_1", "test_batch", "batches.meta"])
def test_real_cifar10_batch_files_that_run_code_are_refused(tmp_path, no_md5, name):
    write_fake_cifar10(tmp_path)
    marker = tmp_path / "ran"
    _plant(tmp_path / "cifar-10-batches-py" / name, {"data": _RunsCode(marker), "labels": [],
                                                     "label_names": _RunsCode(marker)})
    with pytest.raises(UserError, match="refused, nothing in it was run"):
        load_split_tensors(_data_cfg(tmp_path))
    assert not marker.exists()


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_batch_files_of_every_pickle_protocol_are_read(tmp_path, protocol):
    """Real CIFAR-10 files are Python 2 pickles; copies re-saved by other tools use newer
    protocols. The restricted reader rebuilds the arrays of all of them exactly."""
    from autograd_lab.data.cifar import read_batch_file

    data = np.random.default_rng(protocol).integers(0, 256, (7, 3072), dtype=np.uint8)
    path = tmp_path / "batch"
    path.write_bytes(pickle.dumps({"data": data, "labels": list(range(7))}, protocol=protocol))
    entry = read_batch_file(path)
    assert np.array_equal(entry["data"], data) and entry["labels"] == list(range(7))


@pytest.mark.parametrize("damage,message", [
    (lambda e: e.update(labels=e["labels"][:-1]), "20 images but 19 labels"),
    (lambda e: e["labels"].__setitem__(3, 10), "label 10 is outside 0..9"),
    (lambda e: e.update(data=e["data"].astype(np.float32)), "must be a uint8 array"),
    (lambda e: e.update(data=np.array([1, 2, 3], dtype=object)), "array of Python objects"),
])
def test_batch_files_with_the_wrong_content_are_one_clear_error(tmp_path, no_md5, damage,
                                                               message):
    write_fake_cifar10(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    with open(path, "rb") as f:
        entry = pickle.load(f)  # the test's own file
    damage(entry)
    path.write_bytes(pickle.dumps(entry, protocol=2))
    with pytest.raises(UserError, match=message):
        load_split_tensors(_data_cfg(tmp_path))


def test_synthetic_data_is_deterministic(tmp_path):
    a = load_split_tensors(make_cfg(f"data.root={tmp_path / 'a'}").data)
    b = load_split_tensors(make_cfg(f"data.root={tmp_path / 'b'}").data)
    c = load_split_tensors(make_cfg(f"data.root={tmp_path / 'c'}", "data.synthetic_seed=1").data)
    assert torch.equal(a["train_x"], b["train_x"]) and torch.equal(a["test_y"], b["test_y"])
    assert not torch.equal(a["train_x"], c["train_x"])
    assert not torch.equal(a["train_x"][:256], a["test_x"])


def test_batches_cover_each_example_once_per_epoch_in_a_seeded_order():
    x = torch.arange(100).view(100, 1, 1, 1).to(torch.uint8)
    y = torch.arange(100)
    batches = ResidentBatches(x, y, batch_size=32, shuffle=True, seed=5)
    epoch0 = torch.cat([b[1] for b in batches])
    assert sorted(epoch0.tolist()) == list(range(100))
    assert [len(b[1]) for b in batches] == [32, 32, 32, 4] and len(batches) == 4
    assert torch.equal(torch.cat([b[1] for b in batches]), epoch0)  # same epoch, same order
    batches.set_epoch(1)
    assert not torch.equal(torch.cat([b[1] for b in batches]), epoch0)
    plain = ResidentBatches(x, y, batch_size=32, shuffle=False, seed=5)
    assert torch.cat([b[1] for b in plain]).tolist() == list(range(100))


def test_the_loader_position_is_a_lightning_stateful_loader_state():
    """Lightning saves a loader's state_dict with the fit loop and hands it back on resume:
    after p batches of epoch e, a fresh loader given that state yields exactly the rest of the
    epoch, and the next epoch starts from its beginning."""
    from lightning.fabric.utilities.types import _Stateful

    x = torch.arange(300).view(300, 1, 1, 1).to(torch.uint8)
    y = torch.arange(300)
    loader = ResidentBatches(x, y, 32, True, seed=3)
    assert isinstance(loader, _Stateful)  # what Lightning checks before saving the state
    loader.set_epoch(1)
    plain = [b[1] for b in loader]
    assert len(plain) == len(loader) == 10
    for p in range(len(plain)):
        loader.set_epoch(1)
        it = iter(loader)
        for _ in range(p + 1):
            next(it)
        state = loader.state_dict()
        assert state == {"epoch": 1, "position": p + 1}
        resumed = ResidentBatches(x, y, 32, True, seed=3)
        resumed.load_state_dict(state)
        resumed.set_epoch(1)
        rest = [b[1] for b in resumed]
        assert len(rest) == len(plain) - p - 1
        assert all(torch.equal(a, b) for a, b in zip(rest, plain[p + 1:], strict=True))
        resumed.set_epoch(2)  # the resume point is used once
        assert len(list(resumed)) == 10


def test_flip_crop_is_a_flip_and_a_shifted_window():
    x = torch.randn(3, 3, 32, 32)
    flip = torch.tensor([False, True, False])
    dy, dx = torch.tensor([4, 4, 0]), torch.tensor([4, 4, 8])
    out = flip_crop(x, flip, dy, dx)
    assert torch.equal(out[0], x[0])                         # offset 4 of pad 4: unchanged
    assert torch.equal(out[1], x[1].flip(2))                 # flipped only
    padded = torch.nn.functional.pad(x[2:3], (4, 4, 4, 4), mode="reflect")[0]
    assert torch.equal(out[2], padded[:, 0:32, 8:40])        # a shifted window of the padding


def test_no_worker_processes_or_pil_in_the_hot_loop(cfg_factory):
    from autograd_lab.data.loader import CIFARDataModule

    dm = CIFARDataModule(cfg_factory().data, seed=0)
    dm.setup()
    loader = dm.train_dataloader()
    assert not isinstance(loader, torch.utils.data.DataLoader)
    with mock.patch("PIL.Image.fromarray", side_effect=AssertionError("PIL used")):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            for x, y in loader:
                assert x.dtype == torch.uint8 and x.shape[1:] == (3, 32, 32)
                assert y.dtype == torch.int64 and len(y) == len(x)
