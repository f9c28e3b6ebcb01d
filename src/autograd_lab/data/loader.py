"""Resident data: uint8 tensors decoded once, normalised per batch on the device, batched by
index slicing (no per-image Python, no workers), and the Lightning DataModule around them."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torchvision.datasets import CIFAR10

from autograd_lab.config.resources import synthetic_key
from autograd_lab.data.cifar import cached_decode, locate_cifar10
from autograd_lab.data.synthetic import write_synthetic


# ------------------------------------------------------------------ decoding and caching
def load_split_tensors(cfg) -> dict[str, torch.Tensor]:
    """Return {'train_x','train_y','test_x','test_y'}: uint8 NCHW images and int64 labels."""
    root = Path(cfg.root).expanduser()
    if cfg.name == "synthetic":
        folder, dataset_cls = write_synthetic(root / "synthetic" / synthetic_key(cfg), cfg)
    else:
        folder, dataset_cls = locate_cifar10(root, cfg.download), CIFAR10
    return cached_decode(folder, dataset_cls)


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
        return self.train_batches(self.seed)

    def train_batches(self, seed: int) -> ResidentBatches:
        """The training batches in the order (and augmentation) `seed` gives."""
        t, n = self.tensors, self.cfg.get("subset") or None
        return ResidentBatches(t["train_x"][:n], t["train_y"][:n], self.cfg.batch_size,
                               self.cfg.shuffle, seed,
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
        """Normalise (and augment) a batch on its device: (x, y) for the step; NHWC images
        when the module asks for them (model.channels_last)."""
        module = self.trainer.lightning_module
        with module.phase("data"):  # a profiler range while profiling
            x = _prepare(batch[0], batch[2] if len(batch) == 3 else None)
            if getattr(module, "channels_last", False) and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            return x, batch[1]


def _prepare(x: torch.Tensor, aug) -> torch.Tensor:
    x = normalize(x)
    return x if aug is None else flip_crop(x, *aug)
