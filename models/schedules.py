"""Learning-rate and loss-weight schedules (the paper's poly policy), in one place."""
from __future__ import annotations

import torch


def poly_multiplier(epoch: float, epochs: int, power: float = 0.9) -> float:
    """The paper's learning-rate multiplier (1 - e / e_max) ^ 0.9."""
    return (1.0 - epoch / max(1, epochs)) ** power


def ramp(max_value: float, epoch: float, epochs: int) -> float:
    """The paper's weight schedule max_value * (1 - m): 0 at e = 0, max_value at e = e_max."""
    return max_value * (1.0 - poly_multiplier(epoch, epochs))


def scale_lr(optimizer: torch.optim.Optimizer, multiplier: float) -> None:
    """Every parameter group's lr := its initial lr (remembered on first call) * ``multiplier``."""
    for g in optimizer.param_groups:
        g["lr"] = g.setdefault("initial_lr", g["lr"]) * multiplier
