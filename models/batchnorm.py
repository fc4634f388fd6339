"""BatchNorm helpers: freeze the running statistics (extra forwards must not move them) or run
BN in eval mode while the rest trains (fine-tuning on small or shifted data)."""
from __future__ import annotations

from torch import nn


def set_bn_momentum(model: nn.Module, momentum: float | None) -> dict[nn.Module, float | None]:
    """Set every BN layer's momentum; returns the old values (momentum 0 freezes running stats)."""
    old = {}
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            old[m] = m.momentum
            m.momentum = momentum
    return old


class FrozenBatchNormStats:
    """Context: train-mode forwards that do not move BN running statistics (extra forwards
    such as adversarial-example generation must not pollute them)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.old: dict[nn.Module, float | None] = {}

    def __enter__(self):
        self.old = set_bn_momentum(self.model, 0.0)
        return self

    def __exit__(self, *exc):
        for m, v in self.old.items():
            m.momentum = v


def freeze_batchnorm(model: nn.Module) -> None:
    """Every BN layer in eval mode: it uses (and keeps) its running statistics."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
