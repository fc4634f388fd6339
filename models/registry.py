"""The one registry: every named thing a user or a config picks -- classifier architectures,
task sets, loss-weighting methods, defences, distillation methods -- and its ``create_*``
function (timm's ``create_model`` pattern).

Each table maps a name to ``"module:attribute"``, resolved on first use: the command line can
list the choices without importing torch, and no module imports another only to register
itself (no import cycle through the registry). Adding an entry is one line here plus the
class; ``tests/models/test_registry.py`` then checks it for the properties every entry of its
table must have. An unknown name is a :class:`shared.errors.UserError` listing the known ones.
"""
from __future__ import annotations

import importlib
from typing import Any

from shared.errors import UserError


class Registry:
    """name -> ``"module:attribute"``, in the order the names are shown to users."""

    def __init__(self, kind: str, entries: dict[str, str]):
        self.kind = kind
        self._entries = dict(entries)

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def check(self, name: str) -> str:
        """``name`` if registered, else the UserError listing the known names."""
        if name not in self._entries:
            raise UserError(f"unknown {self.kind} {name!r} (choose from {', '.join(self._entries)})")
        return name

    def get(self, name: str) -> Any:
        module, attribute = self._entries[self.check(name)].split(":")
        return getattr(importlib.import_module(module), attribute)

    def create(self, name: str, *args: Any, **kwargs: Any) -> Any:
        return self.get(name)(*args, **kwargs)


ARCHITECTURES = Registry("classifier architecture", {
    "resnet": "models.classifier:ResNetClassifier",
    "cnn5": "models.classifier:CNN5",
})
TASK_SETS = Registry("task set", {
    "cifar": "models.network:TASKS",  # the paper's CIFAR-10 set: class, colour, edges, denoised
    "room": "models.room_network:ROOM_TASKS",  # the paper's NYUv2 set: depth, normals, layout keypoints
})
WEIGHTINGS = Registry("weighting method", {
    "equal": "models.weighting:EqualWeighting",
    "uncertainty": "models.weighting:UncertaintyWeighting",
    "gradnorm": "models.weighting:GradNorm",
    "great": "models.weighting_great:GreatWeighting",
    "dwa": "models.mtl_weightings:DynamicWeightAverage",
    "pcgrad": "models.mtl_weightings:PCGrad",  # on the shared feature's per-task gradients
    "cagrad": "models.mtl_weightings:CAGrad",  # on the shared feature's per-task gradients
    "astmt": "models.astmt:ASTMTTraining",  # ASTMT's adversarial task discriminator (with --architecture astmt: ASTMT)
})
MTL_ARCHITECTURES = Registry("multi-task architecture", {
    "shared": "models.mtl_architectures:shared_encoder",  # the paper's: one shared feature for every head
    "mtan": "models.mtan:MTANNet",
    "astmt": "models.astmt:ASTMTNet",
})
DEFENCES = Registry("defence", {
    "none": "models.defence:NoDefence",
    "fgsm-at": "models.defence:FGSMAdversarialTraining",
    "great": "models.defence:GreatDefence",
    "greace": "models.defence:GreaceDefence",
    "great+ce": "models.defence:GreatPlusCEDefence",
})
DISTILLERS = Registry("distillation method", {
    "none": "models.distill:NoDistillation",
    "kd": "models.distill:SoftTargets",
    "great": "models.distill:GradientAdversarialDistillation",
})
DEFAULT_TASK_SET = "cifar"


def create_classifier(arch: str, cfg: Any) -> Any:
    """A classifier of architecture ``arch`` built from a :class:`models.network.NetConfig`."""
    return ARCHITECTURES.create(arch, cfg)


def get_task_set(name: str = DEFAULT_TASK_SET) -> tuple[str, ...]:
    return tuple(TASK_SETS.get(name))


def create_weighting(name: str, tasks: tuple[str, ...] | None = None, **options: Any) -> Any:
    """Weighting method ``name`` over ``tasks`` (default: the default task set's)."""
    return WEIGHTINGS.create(name, tuple(tasks) if tasks is not None else get_task_set(), **options)


def create_mtl_architecture(name: str, base: Any) -> Any:
    """The multi-task network ``base`` (MultiTaskNet or RoomNet) in architecture ``name``."""
    return MTL_ARCHITECTURES.create(name, base)


def create_defence(name: str, net_cfg: Any, **options: Any) -> Any:
    """A defence for a classifier of architecture ``net_cfg`` (its aux net copies the family)."""
    return DEFENCES.create(name, net_cfg, **options)


def create_distiller(name: str, student_cfg: Any, teacher: Any, **options: Any) -> Any:
    return DISTILLERS.create(name, student_cfg, teacher, **options)


def check_choice(option: str, value: str, choices: tuple[str, ...]) -> str:
    """``value`` if it is one of ``choices``, else a one-line UserError naming the option."""
    if value not in choices:
        raise UserError(f"{option} must be {' or '.join(repr(c) for c in choices)}, got {value!r}")
    return value
