"""The base of every training method that owns optimizers (GradNorm's weights, GREAT's
auxiliary classifier and GALs, a defence's auxiliary classifier, a discriminator): they follow
the main lr policy, step after each backward, and their state saves with the method's
``state_dict`` (one mechanism for all methods)."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from models.schedules import scale_lr


class OwnOptimizers(nn.Module):
    def _own_optimizers(self) -> list[torch.optim.Optimizer]:
        return []

    def set_lr_multiplier(self, m: float) -> None:
        """Apply the epoch's poly multiplier to the method's own optimizers."""
        for opt in self._own_optimizers():
            scale_lr(opt, m)

    def _zero_own(self) -> None:
        for opt in self._own_optimizers():
            opt.zero_grad(set_to_none=True)

    def _backward_and_step(self, total: torch.Tensor) -> None:
        """``total`` was computed after :meth:`_zero_own`; backward, then step the own optimizers."""
        if total.requires_grad:
            total.backward()
        for opt in self._own_optimizers():
            opt.step()

    def get_extra_state(self) -> dict[str, Any]:
        return {"optimizers": [o.state_dict() for o in self._own_optimizers()]}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        for o, s in zip(self._own_optimizers(), state.get("optimizers", [])):
            o.load_state_dict(s)
