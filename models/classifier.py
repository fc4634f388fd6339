"""Single-task classifier architectures for the adversarial defence and distillation experiments
(registered in :mod:`models.registry` as ``resnet`` and ``cnn5``; build with
:func:`models.registry.create_classifier`).

``resnet``  our encoder family (:class:`models.network.Encoder`) plus the ResNet
            classifier tail (:class:`models.network.ClassHead`); RGB input in [0, 1],
            normalisation inside the model. The defence's main network, the
            distillation teacher, and -- with leaky-ReLU 0.2 -- the defence's
            auxiliary classifier (the paper: "a copy of the main network").
``cnn5``    the paper's CNN-5 student (supplement, CNN-5+ResNet-18): three 3x3
            convs (32, 64, 128 channels, the 2nd and 3rd with stride 2), then two
            linear layers (128, classes); BN + ReLU after every layer but the last.
            With leaky-ReLU 0.2 it is the distillation's binary discriminator.

Every architecture's class carries its registry ``name`` (saved in checkpoints) and its
:class:`models.network.NetConfig` as ``cfg``. Their explicit input gradient is in
:mod:`models.input_gradients`, their data in :mod:`models.labelled`, their checkpoints in
:mod:`models.checkpoints`.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn
import torch.nn.functional as F

from models.network import ClassHead, Encoder, NetConfig, make_activation


class ResNetClassifier(nn.Module):
    """Encoder + global-pool linear head: logits for an image batch (B x C x H x W in [0, 1])."""

    name = "resnet"

    def __init__(self, cfg: NetConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.head = ClassHead(cfg.feature_channels, cfg.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


class CNN5(nn.Module):
    """The paper's CNN-5 (3 convs of 32/64/128 channels, strides 1/2/2; linear 128; linear classes).

    ``cfg.width`` is the first conv's channels (paper: 32). The convolutional output is
    average-pooled to 8 x 8 before flattening -- exactly the paper's 8 x 8 x 128 at 32 x 32
    input -- so any input size works.
    """

    name = "cnn5"

    def __init__(self, cfg: NetConfig):
        super().__init__()
        self.cfg = cfg
        w, act = cfg.width, cfg.activation
        self.register_buffer("mean", torch.tensor(cfg.mean), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.std), persistent=False)
        layers: list[nn.Module] = []
        cin = cfg.in_channels
        for i, stride in enumerate((1, 2, 2)):
            cout = w << i
            layers += [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), make_activation(act)]
            cin = cout
        self.features = nn.Sequential(*layers)
        self.fc1 = nn.Sequential(nn.Linear(cin * 64, 128, bias=False), nn.BatchNorm1d(128), make_activation(act))
        self.fc2 = nn.Linear(128, cfg.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = pool_to(self.features((x - self.mean) / self.std), 8)
        return self.fc2(self.fc1(f.flatten(1)))


def pool_to(h: torch.Tensor, side: int) -> torch.Tensor:
    """``nn.AdaptiveAvgPool2d(side)(h)``, the same values, without its slow general kernel where it
    is not needed: the identity when ``h`` is already side x side (CNN-5 at 32x32 input), a plain
    average pool when the sides divide (measured: the adaptive kernel cost ~13 % of a CNN-5 step)."""
    hh, ww = h.shape[-2:]
    if (hh, ww) == (side, side):
        return h
    if hh % side == 0 and ww % side == 0:
        return F.avg_pool2d(h, (hh // side, ww // side))
    return F.adaptive_avg_pool2d(h, side)


def aux_copy_config(cfg: NetConfig, num_classes: int | None = None) -> NetConfig:
    """The auxiliary network's config: same family, leaky-ReLU 0.2, no pixel normalisation
    (its input is a gradient, normalised per sample by the caller)."""
    return dataclasses.replace(cfg, activation="leaky", mean=0.0, std=1.0,
                               num_classes=cfg.num_classes if num_classes is None else num_classes)
