"""MTAN, the Multi-Task Attention Network (Liu, Johns, Davison, CVPR 2019), on our encoders.

The shared encoder runs once; each task has a soft attention module at every encoder stage j:
a_j = sigmoid(h_j([p_j, c_j(t_{j-1})])), t_j = a_j * p_j, with p_j the shared stage output, t_{j-1}
the task's attended feature of the stage before (c_j: a 3x3 conv at the stage's stride, matching
its resolution and channels; none at the first stage) and h_j two 1x1 conv-BN layers. The task's
head sees t_last, the same shape as the shared feature f. (MTAN takes the mask's input from the
block's first layer and multiplies its last; here both are the stage output: our stages are one or
two residual blocks.) Every mask is an ordinary conv / sigmoid / mul in the exported ONNX graph.
"""
from __future__ import annotations

import torch
from torch import nn

from models.mtl_architectures import TaskStages


class StageFeatures(tuple):
    """The shared encoder's stage outputs p_1..p_n; ``shape`` is the last one's (the shared feature's)."""

    @property
    def shape(self) -> torch.Size:
        return self[-1].shape


class TaskAttention(nn.Module):
    """One task's attention at one stage: the mask a_j in [0, 1] and t_j = a_j * p_j."""

    def __init__(self, channels: int, prev_channels: int, stride: int):
        super().__init__()
        self.carry = nn.Sequential(nn.Conv2d(prev_channels, channels, 3, stride, 1, bias=False),
                                   nn.BatchNorm2d(channels), nn.ReLU(inplace=True)) if prev_channels else None
        cin = channels + (channels if prev_channels else 0)
        self.mask = nn.Sequential(nn.Conv2d(cin, channels, 1, bias=False), nn.BatchNorm2d(channels),
                                  nn.ReLU(inplace=True), nn.Conv2d(channels, channels, 1, bias=False),
                                  nn.BatchNorm2d(channels), nn.Sigmoid())

    def attention(self, shared: torch.Tensor, previous: torch.Tensor | None) -> torch.Tensor:
        inp = shared if self.carry is None or previous is None else torch.cat([shared, self.carry(previous)], 1)
        return self.mask(inp)

    def forward(self, shared: torch.Tensor, previous: torch.Tensor | None) -> torch.Tensor:
        return self.attention(shared, previous) * shared


class MTANNet(TaskStages):
    """``base`` (MultiTaskNet or RoomNet) with one :class:`TaskAttention` per task and stage."""

    architecture = "mtan"
    weightings = ("equal", "uncertainty", "dwa")

    def __init__(self, base: nn.Module):
        super().__init__(base)
        chans, strides = self.stage_channels, self.stage_strides
        # keys "<task>_attention": a bare "class" breaks torch.export's generated code
        self.attention = nn.ModuleDict({f"{t}_attention": nn.ModuleList([
            TaskAttention(c, chans[j - 1] if j else 0, strides[j]) for j, c in enumerate(chans)])
            for t in self.tasks})

    def encode(self, x: torch.Tensor) -> StageFeatures:
        h, feats = self.stem(x), []
        for stage in self.base.encoder.stages:
            h = stage(h)
            feats.append(h)
        return StageFeatures(feats)

    def task_feature(self, feats: StageFeatures, task: str) -> torch.Tensor:
        t = None
        for p, att in zip(feats, self.attention[f"{task}_attention"]):
            t = att(p, t)
        assert t is not None
        return t

    def masks(self, feats: StageFeatures, task: str) -> list[torch.Tensor]:
        """The task's attention masks a_j at every stage (for inspection and tests)."""
        out, t = [], None
        for p, att in zip(feats, self.attention[f"{task}_attention"]):
            out.append(att.attention(p, t))
            t = out[-1] * p
        return out

    def decode(self, f: StageFeatures | dict[str, StageFeatures],
               image: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        feats = f if isinstance(f, dict) else {t: f for t in self.tasks}
        return self.base.decode({t: self.task_feature(ft, t) for t, ft in feats.items()}, image)
