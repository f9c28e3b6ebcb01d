"""The data of a stacked group (hydra/launcher=stacked): every member draws its own batches in
its own order (its seed's ResidentBatches, exactly what its separate run would draw), and a
step's batch is all members' batches at once: images [N*B, ...] (normalised and augmented as
one batch: per-image operations, so each image is what the separate run would see) and labels
[N, B]. Validation uses one test batch for all members."""

from __future__ import annotations

import torch

from autograd_lab.data.loader import CIFARDataModule, ResidentBatches


class StackedBatches:
    """One epoch of every member's batches, side by side. A stateful loader in Lightning's sense
    (its state is the members' common position), and its own sampler (set_epoch)."""

    def __init__(self, members: list[ResidentBatches]):
        self.members = members
        self.sampler, self.batch_sampler = self, None

    def set_epoch(self, epoch: int) -> None:
        for m in self.members:
            m.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.members[0])

    @property
    def resume_at(self):
        return self.members[0].resume_at

    def state_dict(self) -> dict:
        return self.members[0].state_dict()  # all members stand at the same position

    def load_state_dict(self, state: dict) -> None:
        for m in self.members:
            m.load_state_dict(state)

    def __iter__(self):
        for parts in zip(*self.members, strict=True):
            x = torch.cat([p[0] for p in parts])
            y = torch.stack([p[1] for p in parts])
            if len(parts[0]) == 2:
                yield x, y
            else:  # each member's augmentation draws, concatenated like its images
                yield x, y, tuple(torch.cat([p[2][k] for p in parts]) for k in range(3))


class StackedDataModule(CIFARDataModule):
    """CIFARDataModule whose training batches are the members' (`seeds`, one per member)."""

    def __init__(self, cfg, seeds: list[int], tensors: dict[str, torch.Tensor] | None = None):
        super().__init__(cfg, seeds[0], tensors=tensors)
        self.seeds = list(seeds)

    def train_dataloader(self) -> StackedBatches:
        return StackedBatches([self.train_batches(seed) for seed in self.seeds])
