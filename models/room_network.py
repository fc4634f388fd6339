"""The room model: the GREAT paper's NYUv2 network (depth, surface normals, room-layout keypoints).

Paper (supplement): a dilated residual encoder that downsamples the input 8 times, two stages at
dilation 2 and one at dilation 4 after it; each task's decoder is one stride-2 upsampling and 3
convolutions, so a 320x320 input gives 80x80 outputs (GradNorm's resolutions). Here the encoder is
a stem (stride 2), three residual stages (strides 1, 2, 2: output stride 8, 4 * width channels)
and two dilated stages (dilation 2, then 4) at that stride; the paper's has 43 layers and 512
channels, ours is sized by ``width`` and ``blocks`` (a reduced-scale deviation, README).

Outputs at a quarter of the input size (H/4 x W/4): ``depth`` (1 channel, metres, linear; the
exported model clamps it to >= MIN_DEPTH_M), ``normals`` (3 channels, L2-normalised per pixel:
the loss 1 - |cos| is on unit vectors), ``keypoints`` (one Gaussian heatmap per typed layout
keypoint of shared/rooms.py: 32 channels, not the paper's 48 RoomNet types; linear, clamped to
[0, 1] in evaluation and export). Input: RGB in [0, 1] (NYUv2's input is colour), normalised
inside the model. The shared feature ``f`` (B x 4w x H/8 x W/8) is where GREAT's GALs act.
"""
from __future__ import annotations

import dataclasses
import torch
from torch import nn
import torch.nn.functional as F

from shared.rooms import NUM_KEYPOINTS

from models.network import ArchitectureFields, ResidualBlock, SharedEncoderNet, make_activation

ROOM_TASKS: tuple[str, ...] = ("depth", "normals", "keypoints")
MIN_DEPTH_M = 0.05  # the exported depth is clamped to this (rendered depth is > 0.3 m)
DEPTH_PRIOR_M = 3.0  # the depth head starts here (a typical distance in a room)


@dataclasses.dataclass
class RoomNetConfig(ArchitectureFields):
    """Architecture of :class:`RoomNet`; stored in every checkpoint and manifest."""

    width: int = 16  # channels after the stem; the shared feature has 4 * width
    blocks: tuple[int, ...] = (1, 1, 1, 1, 1)  # residual blocks per stage (strides 1 2 2, dilations 2 4)
    decoder_width: int = 32
    in_channels: int = 3
    num_keypoints: int = NUM_KEYPOINTS
    mean: float = 0.45
    std: float = 0.25
    activation: str = "relu"
    task_set: str = "room"  # what a checkpoint or manifest records: the headset picks its overlays by it

    @property
    def feature_channels(self) -> int:
        return 4 * self.width

    @property
    def num_classes(self) -> int:  # no class head
        return 0


STAGE_STRIDES = (1, 2, 2, 1, 1)
STAGE_DILATIONS = (1, 1, 1, 2, 4)


class DilatedEncoder(nn.Module):
    """Stem (stride 2), stages of residual blocks with strides (1, 2, 2) then dilations (2, 4):
    output stride 8, 4 * width channels."""

    def __init__(self, cfg: RoomNetConfig):
        super().__init__()
        if len(cfg.blocks) != len(STAGE_STRIDES) or min(cfg.blocks) < 1:
            raise ValueError(f"room encoder needs {len(STAGE_STRIDES)} stages of >= 1 block, got {cfg.blocks}")
        w, act = cfg.width, cfg.activation
        self.register_buffer("mean", torch.tensor(cfg.mean), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.std), persistent=False)
        self.stem = nn.Sequential(nn.Conv2d(cfg.in_channels, w, 3, 2, 1, bias=False), nn.BatchNorm2d(w),
                                  make_activation(act))
        widths = (w, 2 * w, 4 * w, 4 * w, 4 * w)
        stages, cin = [], w
        for n, cout, stride, dil in zip(cfg.blocks, widths, STAGE_STRIDES, STAGE_DILATIONS):
            layers = [ResidualBlock(cin, cout, stride, act, dilation=dil)]
            layers += [ResidualBlock(cout, cout, 1, act, dilation=dil) for _ in range(n - 1)]
            stages.append(nn.Sequential(*layers))
            cin = cout
        self.stages = nn.Sequential(*stages)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem((x - self.mean) / self.std))


class RoomDecoder(nn.Module):
    """One stride-2 upsampling (nearest x2) and 3 convolutions: 3x3-BN-ReLU, 3x3-BN-ReLU, 1x1 out."""

    def __init__(self, cin: int, cout: int, width: int, activation: str = "relu", bias: float = 0.0):
        super().__init__()
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.convs = nn.Sequential(
            nn.Conv2d(cin, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), make_activation(activation),
            nn.Conv2d(width, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), make_activation(activation))
        self.out = nn.Conv2d(width, cout, 1)
        nn.init.normal_(self.out.weight, std=1e-2)
        nn.init.constant_(self.out.bias, bias)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.out(self.convs(self.up(f)))


class RoomNet(SharedEncoderNet):
    """Same interface as :class:`models.network.MultiTaskNet` (``encode``, ``decode``, ``head``,
    ``tasks``, ``encoder.stages[-1][-1].conv2`` for GradNorm): every weighting method trains it."""

    def __init__(self, cfg: RoomNetConfig | None = None):
        super().__init__()
        self.cfg = cfg or RoomNetConfig()
        self.encoder = DilatedEncoder(self.cfg)
        c, d, act = self.cfg.feature_channels, self.cfg.decoder_width, self.cfg.activation
        self.heads = nn.ModuleDict({
            "depth_head": RoomDecoder(c, 1, d, act, bias=DEPTH_PRIOR_M),
            "normals_head": RoomDecoder(c, 3, d, act),
            "keypoints_head": RoomDecoder(c, self.cfg.num_keypoints, d, act),
        })
        with torch.no_grad():  # normals start facing the camera (a wall seen head-on), not at zero length
            self.heads["normals_head"].out.bias.copy_(torch.tensor([0.0, 0.0, -1.0]))

    @property
    def tasks(self) -> tuple[str, ...]:
        return ROOM_TASKS

    def decode(self, f: torch.Tensor | dict[str, torch.Tensor],
               image: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Every head (``f``: one feature, or one detached copy per task). Training sees the raw depth
        and keypoint outputs (a clamp would stop the gradient of pixels pushed past it); evaluation
        and export clamp them. Normals are always unit vectors."""
        feats = f if isinstance(f, dict) else {t: f for t in ROOM_TASKS}
        out = {}
        for t, ft in feats.items():
            y = self.head(t)(ft)
            if t == "normals":
                y = F.normalize(y, dim=1, eps=1e-6)
            elif not self.training:
                y = y.clamp(min=MIN_DEPTH_M) if t == "depth" else y.clamp(0.0, 1.0)
            out[t] = y
        return out

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.decode(self.encode(x))


class RoomOnnxWrapper(nn.Module):
    """Tuple outputs in a fixed order, for export: depth, normals, keypoints."""

    OUTPUT_NAMES = ("depth", "normals", "keypoints")

    def __init__(self, net: RoomNet):
        super().__init__()
        self.net = net

    def forward(self, image: torch.Tensor):
        out = self.net(image)
        return out["depth"], out["normals"], out["keypoints"]
