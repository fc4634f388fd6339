"""Labelled RGB images for the classifier experiments (defence, distillation, attacks): the
tensors they train on, the paper's augmentation (flips, crops from a 4-padded image) and
top-1 accuracy."""
from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

from shared.errors import UserError

from models.data import load_source


@dataclasses.dataclass
class LabelledImages:
    """Labelled RGB images as tensors: ``x`` float B x 3 x H x W in [0, 1], ``y`` int64."""

    x: torch.Tensor
    y: torch.Tensor
    class_names: list[str]
    source: str

    def __len__(self) -> int:
        return len(self.y)

    @property
    def size(self) -> int:
        return int(self.x.shape[-1])

    def subset(self, idx: torch.Tensor | np.ndarray) -> "LabelledImages":
        idx = torch.as_tensor(idx, dtype=torch.long)
        return LabelledImages(self.x[idx], self.y[idx], self.class_names, self.source)

    def fraction(self, frac: float, seed: int = 0) -> "LabelledImages":
        """A class-stratified random ``frac`` of the set (at least one image per present class)."""
        if not 0.0 < frac <= 1.0:
            raise UserError(f"fraction must be in (0, 1], got {frac}")
        if frac == 1.0:
            return self
        g = np.random.default_rng(seed)
        y = self.y.numpy()
        keep = []
        for c in np.unique(y):
            idx = np.nonzero(y == c)[0]
            k = max(1, int(round(frac * len(idx))))
            keep.append(g.choice(idx, k, replace=False))
        return self.subset(np.sort(np.concatenate(keep)))


def load_labelled(source: str, split: str, size: int | None, seed: int = 0,
                  limit: int | None = None) -> LabelledImages:
    """``load_source`` restricted to labelled frames, as [0, 1] tensors."""
    frames = load_source(source, split, size, seed)
    keep = np.nonzero(frames.labels >= 0)[0]
    if len(keep) == 0:
        raise UserError(f"data source {source!r} ({split}) has no labelled frames: classifiers need labels")
    if limit is not None:
        keep = keep[:limit]
    x = torch.from_numpy(np.ascontiguousarray(frames.rgb[keep].transpose(0, 3, 1, 2))).float() / 255.0
    return LabelledImages(x, torch.from_numpy(frames.labels[keep].astype(np.int64)), list(frames.class_names),
                          frames.source)


def augment(x: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random horizontal flips and random crops from a ``pad``-padded image (the paper's)."""
    b, _, h, w = x.shape
    flip = torch.rand(b, generator=generator) < 0.5
    x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
    if pad <= 0:
        return x
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    # gather the crops with one indexing op (no Python loop per sample)
    rows = (dy.view(b, 1) + torch.arange(h).view(1, h)).view(b, 1, h, 1).expand(b, x.shape[1], h, w + 2 * pad)
    padded = padded.gather(2, rows)
    cols = (dx.view(b, 1) + torch.arange(w).view(1, w)).view(b, 1, 1, w).expand(b, x.shape[1], h, w)
    return padded.gather(3, cols).contiguous()


@torch.no_grad()
def accuracy(model: nn.Module, data: LabelledImages, batch_size: int = 256) -> float:
    """Top-1 accuracy in % (eval mode; the model's mode is restored afterwards)."""
    was = model.training
    model.eval()
    correct = 0
    for s in range(0, len(data), batch_size):
        correct += int((model(data.x[s:s + batch_size]).argmax(1) == data.y[s:s + batch_size]).sum())
    model.train(was)
    return 100.0 * correct / max(1, len(data))


