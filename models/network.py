"""The multi-task network: a shared residual encoder and four task heads.

Tasks (the paper's CIFAR-10 multi-task set): ``class`` (scene class logits),
``colour`` (RGB colourisation), ``edges`` (edge map), ``denoised`` (clean gray).
Input: one noisy gray channel in [0, 1]; the mean/std normalisation lives inside
the model so every consumer feeds plain [0, 1] pixels. Dense heads are fully
convolutional: any input whose sides divide by 8.

The encoder's last output ``f`` (B x C x H/8 x W/8) is the shared feature at
which GREAT's gradient-alignment layers act (in the backward pass only: they are
not part of this module, so an exported model has no trace of them).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn
import torch.nn.functional as F

TASKS: tuple[str, ...] = ("class", "colour", "edges", "denoised")
DENSE_TASKS: tuple[str, ...] = ("colour", "edges", "denoised")
TASK_CHANNELS = {"colour": 3, "edges": 1, "denoised": 1}
RESIDUAL_TASKS = ("colour", "denoised")  # camera decoder: output = input gray + head
TASK_PRIORS = {"colour": 0.5, "edges": 0.05, "denoised": 0.5}  # initial output (edge pixels are ~5 %)


class ArchitectureFields:
    """``to_dict`` / ``from_dict`` of an architecture dataclass with a ``blocks`` tuple (a list in JSON)."""

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)  # type: ignore[call-overload]
        d["blocks"] = list(d["blocks"])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown architecture fields {sorted(unknown)}")
        d = dict(d)
        if "blocks" in d:
            d["blocks"] = tuple(d["blocks"])
        return cls(**d)


@dataclasses.dataclass
class NetConfig(ArchitectureFields):
    """Architecture of :class:`MultiTaskNet`; stored in every checkpoint and manifest."""

    num_classes: int = 6
    width: int = 16  # channels after the stem; the shared feature has 4 * width
    blocks: tuple[int, int, int] = (1, 1, 1)  # residual blocks per encoder stage
    decoder_width: int = 32  # channels of the first decoder stage (halved per stage, floor 8)
    in_channels: int = 1
    mean: float = 0.5
    std: float = 0.25
    activation: str = "relu"  # "relu" or "leaky" (leaky-ReLU 0.2, the paper's aux nets)
    # "paper": each dense decoder sees only the shared feature f and ends in a sigmoid (the paper's
    # 32x32 decoders). "camera": each decoder also sees the input image at every stage (a skip from
    # the input, not from the encoder, so every gradient into the shared encoder still passes through
    # f, where GREAT's GALs act) and the colour and denoised heads are residual over the input gray
    # (they start as "show the gray frame" and learn the difference). The headset's decoder, a deviation
    # from the paper for camera-resolution frames: see the README's deviations table.
    decoder: str = "paper"

    @property
    def feature_channels(self) -> int:
        return 4 * self.width


def make_activation(kind: str) -> nn.Module:
    if kind == "relu":
        return nn.ReLU(inplace=True)
    if kind == "leaky":
        return nn.LeakyReLU(0.2, inplace=True)
    raise ValueError(f"unknown activation {kind!r}")


class ResidualBlock(nn.Module):
    """The ResNet basic block (two 3x3 convs, BN, identity or 1x1 projection skip); ``dilation``
    for the room model's dilated stages (padding follows, so the size is kept)."""

    def __init__(self, cin: int, cout: int, stride: int = 1, activation: str = "relu", dilation: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, dilation, dilation, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, dilation, dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.act = make_activation(activation)
        self.skip: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.skip = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act(out + self.skip(x))


class Encoder(nn.Module):
    """Stem (stride 2) then three residual stages; output stride 8, 4*width channels."""

    def __init__(self, cfg: NetConfig):
        super().__init__()
        w, act = cfg.width, cfg.activation
        self.register_buffer("mean", torch.tensor(cfg.mean), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.std), persistent=False)
        self.stem = nn.Sequential(nn.Conv2d(cfg.in_channels, w, 3, 2, 1, bias=False), nn.BatchNorm2d(w),
                                  make_activation(act))
        stages = []
        cin = w
        for i, (n, cout) in enumerate(zip(cfg.blocks, (w, 2 * w, 4 * w))):
            layers = [ResidualBlock(cin, cout, 1 if i == 0 else 2, act)]
            layers += [ResidualBlock(cout, cout, 1, act) for _ in range(n - 1)]
            stages.append(nn.Sequential(*layers))
            cin = cout
        self.stages = nn.Sequential(*stages)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem((x - self.mean) / self.std))


class DenseDecoder(nn.Module):
    """Three x2 upsampling stages, each a conv and a residual block, then a 1x1 output conv.

    The camera decoder (``input_skip``) has linear outputs instead of the paper's sigmoid: with MSE
    on sparse edge maps a sigmoid at its 5 % prior passes a twentieth of the gradient, and the edge
    head barely moved in our first real-photo runs. ``residual``: the output is the input gray
    (repeated to ``cout`` channels) plus the head's output, which starts near zero. Training sees the
    unclamped output (a clamp would stop the gradient of pixels pushed past 0 or 1); evaluation and
    the exported model clamp it to [0, 1].
    """

    def __init__(self, cin: int, cout: int, width: int, activation: str = "relu", prior: float = 0.5,
                 input_skip: bool = False, residual: bool = False, in_channels: int = 1):
        super().__init__()
        self.input_skip, self.residual = input_skip, residual
        skip_c = in_channels if input_skip else 0
        stages = []
        c = cin
        for i in range(3):
            nxt = max(8, width >> i)
            stages.append(nn.ModuleDict({
                "up": nn.Upsample(scale_factor=2, mode="nearest"),
                "conv": nn.Sequential(nn.Conv2d(c + skip_c, nxt, 3, 1, 1, bias=False), nn.BatchNorm2d(nxt),
                                      make_activation(activation)),
                "block": ResidualBlock(nxt, nxt, 1, activation),
            }) if input_skip else nn.Sequential(
                nn.Upsample(scale_factor=2, mode="nearest"),
                nn.Conv2d(c, nxt, 3, 1, 1, bias=False), nn.BatchNorm2d(nxt), make_activation(activation),
                ResidualBlock(nxt, nxt, 1, activation),
            ))
            c = nxt
        self.stages = nn.ModuleList(stages) if input_skip else nn.Sequential(*stages)
        self.out = nn.Conv2d(c, cout, 1)
        if residual:  # start (within ~1e-2) at "the input gray", the classical colour baseline; small,
            # not zero, weights so that the task's gradient reaches the shared feature from the first step
            nn.init.normal_(self.out.weight, std=1e-3)
            nn.init.zeros_(self.out.bias)
        elif input_skip:  # camera decoder, edges: a linear output starting at the target's typical value
            nn.init.normal_(self.out.weight, std=1e-3)
            nn.init.constant_(self.out.bias, prior)
        else:  # start the sigmoid at the target's typical value (edges are sparse): faster, stabler start
            nn.init.constant_(self.out.bias, float(torch.logit(torch.tensor(prior))))

    def forward(self, f: torch.Tensor, image: torch.Tensor | None = None) -> torch.Tensor:
        if not self.input_skip:
            return torch.sigmoid(self.out(self.stages(f)))
        if image is None:
            raise ValueError("the camera decoder needs the input image")
        h = f
        for i, stage in enumerate(self.stages):
            h = stage["up"](h)
            scale = 2 ** (2 - i)  # the input at this stage's resolution (1/4, 1/2, 1)
            x = F.avg_pool2d(image, scale) if scale > 1 else image
            h = stage["block"](stage["conv"](torch.cat([h, x], dim=1)))
        out = self.out(h)
        if self.residual:
            out = image[:, :1].expand(-1, out.shape[1], -1, -1) + out
        return out if self.training else out.clamp(0.0, 1.0)


class ClassHead(nn.Module):
    """Global average pooling and a linear layer (the ResNet classifier's tail)."""

    def __init__(self, cin: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.fc(f.mean(dim=(2, 3)))


class SharedEncoderNet(nn.Module):
    """One shared encoder (``self.encoder``) and one head per task (``self.heads["<task>_head"]``):
    the interface the weightings, GREAT's GALs and the export use, for every task set."""

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def head(self, task: str) -> nn.Module:
        return self.heads[f"{task}_head"]


class MultiTaskNet(SharedEncoderNet):
    def __init__(self, cfg: NetConfig | None = None):
        super().__init__()
        self.cfg = cfg or NetConfig()
        self.encoder = Encoder(self.cfg)
        c = self.cfg.feature_channels
        # ModuleDict keys are "<task>_head": "class" alone is a Python keyword, which breaks
        # torch.export's generated code.
        self.heads = nn.ModuleDict({"class_head": ClassHead(c, self.cfg.num_classes)})
        if self.cfg.decoder not in ("paper", "camera"):
            raise ValueError(f"unknown decoder {self.cfg.decoder!r} (paper or camera)")
        camera = self.cfg.decoder == "camera"
        for task in DENSE_TASKS:
            self.heads[f"{task}_head"] = DenseDecoder(
                c, TASK_CHANNELS[task], self.cfg.decoder_width, self.cfg.activation, TASK_PRIORS[task],
                input_skip=camera, residual=camera and task in RESIDUAL_TASKS, in_channels=self.cfg.in_channels)

    @property
    def tasks(self) -> tuple[str, ...]:
        return TASKS

    def decode(self, f: torch.Tensor | dict[str, torch.Tensor],
               image: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Run every head; ``f`` may be one feature or one (detached) copy per task. The camera
        decoder also needs the input ``image`` (no parameters act on it before the decoders)."""
        feats = f if isinstance(f, dict) else {t: f for t in TASKS}
        camera = self.cfg.decoder == "camera"
        return {t: self.head(t)(ft, image) if camera and t in DENSE_TASKS else self.head(t)(ft)
                for t, ft in feats.items()}

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.decode(self.encode(x), x)


class OnnxWrapper(nn.Module):
    """Tuple outputs in a fixed order, for export: class logits, colour, edges, denoised."""

    OUTPUT_NAMES = ("class_logits", "colour", "edges", "denoised")

    def __init__(self, net: MultiTaskNet):
        super().__init__()
        self.net = net

    def forward(self, image: torch.Tensor):
        out = self.net(image)
        return out["class"], out["colour"], out["edges"], out["denoised"]
