"""Multi-task architectures beside the shared encoder (``shared``: the paper's network, one encoder
feature for every head): ``mtan`` (:mod:`models.mtan`) and ``astmt`` (:mod:`models.astmt`), registered
in :data:`models.registry.MTL_ARCHITECTURES`; and the named methods of the Table 4 comparison, each a
(weighting, architecture) pair.

A wrapper takes the task set's network (``MultiTaskNet`` or ``RoomNet``) as ``base`` and keeps its
stem, encoder stages and heads; it adds its task-specific modules and changes which feature each head
sees. Its ``encode`` returns what its ``decode`` needs, so the loss-based weightings (``equal``,
``uncertainty``, ``dwa``) train it unchanged; the weightings on one shared feature's per-task
gradients (``great``, ``pcgrad``, ``cagrad``, ``gradnorm``'s shared layer) need the plain network.
"""
from __future__ import annotations

import torch
from torch import nn

from shared.errors import UserError

# method name -> (weighting, architecture): every weighting on the shared network, then the two
# architectures, each trained as its paper trains it (MTAN with equal weights, as the MTAN paper's
# "Equal" column: the architecture alone; ASTMT with its adversarial task discriminator)
ARCHITECTURE_METHODS = {"mtan": ("equal", "mtan"), "astmt": ("astmt", "astmt")}


def shared_encoder(base: nn.Module) -> nn.Module:
    """The paper's network as it is."""
    return base


def all_methods() -> list[str]:
    """Every method of the comparison: the registered weightings (on the shared network) and the
    architectures."""
    from models.registry import WEIGHTINGS

    return [m for m in WEIGHTINGS.names() if m not in ARCHITECTURE_METHODS] + list(ARCHITECTURE_METHODS)


def method_spec(method: str) -> tuple[str, str]:
    """(weighting, architecture) of a Table 4 method name."""
    from models.registry import WEIGHTINGS

    if method in ARCHITECTURE_METHODS:
        return ARCHITECTURE_METHODS[method]
    return WEIGHTINGS.check(method), "shared"


def parse_methods(text: str) -> list[str]:
    """``all`` or a comma-separated list of method names; a UserError for an unknown one."""
    known = all_methods()
    methods = known if text == "all" else [m for m in text.split(",") if m]
    unknown = [m for m in methods if m not in known]
    if unknown or not methods:
        raise UserError(f"unknown methods {unknown} (choose from all, {', '.join(known)})")
    return methods


def check_pair(architecture: str, weighting: str, model: nn.Module) -> None:
    allowed = getattr(model, "weightings", None)
    if allowed is not None and weighting not in allowed:
        raise UserError(f"the {architecture} architecture trains with {' or '.join(allowed)} "
                        f"(its heads see task-specific features, not one shared feature), not {weighting!r}")


class TaskStages(nn.Module):
    """What the wrappers share: the base network's normalisation, stem and encoder stages, and the
    channels and stride of every stage (for their task-specific modules)."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        self.cfg = base.cfg
        stages = base.encoder.stages
        self.stage_channels = [int(s[-1].conv2.out_channels) for s in stages]
        self.stage_strides = [int(s[0].conv1.stride[0]) for s in stages]

    @property
    def tasks(self) -> tuple[str, ...]:
        return self.base.tasks

    @property
    def encoder(self) -> nn.Module:
        return self.base.encoder

    def head(self, task: str) -> nn.Module:
        return self.base.head(task)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        enc = self.base.encoder
        return enc.stem((x - enc.mean) / enc.std)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.decode(self.encode(x), x)
