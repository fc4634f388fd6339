"""The frame set every data source returns (kept apart so that readers such as models.idx_data
need not import models.data)."""
from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass
class FrameSet:
    """Colour frames (N x H x W x 3 uint8 RGB) with class labels (-1 = unlabelled)."""

    rgb: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    source: str

    def __len__(self) -> int:
        return len(self.rgb)

    @property
    def labelled(self) -> bool:
        return bool((self.labels >= 0).any())

    def subset(self, idx: np.ndarray) -> "FrameSet":
        return FrameSet(self.rgb[idx], self.labels[idx], self.class_names, self.source)
