"""ASTMT, Attentive Single-Tasking of Multiple Tasks (Maninis, Radosavovic, Kokkinos, CVPR 2019),
on our encoders: the architecture (:class:`ASTMTNet`) and its adversarial training
(:class:`ASTMTTraining`, registered as the weighting ``astmt``).

Architecture: the network runs once per task ("single-tasking"); after every encoder stage a
task-specific squeeze-and-excitation module rescales the stage's channels (ASTMT puts SE modules
per task in every residual block of encoder and decoder, plus residual adapters; here one per
encoder stage, no adapters). The heads are the base network's.

Training, as the official code (facebookresearch/astmt) does: for each task, its loss J_t and the
gradient g_t = dJ_t/df_t at the feature its head sees (``create_graph``: double backprop); g_t
normalised per pixel over channels; a gradient-reversal layer scaled by Ganin's
alpha = 2 / (1 + exp(-10 (e + 1) / E)) - 1; a fully convolutional discriminator (depth 2, 1x1 kernels)
classifies every pixel of it into the task; loss (1 - w) J_t + w CE with w = 0.01, the discriminator
at 10x the main learning rate. The network is trained to make its tasks' gradients indistinguishable.
(The official code steps the optimizer once per task; every method here steps once per batch, on
the sum over tasks.)
"""
from __future__ import annotations

import math

import torch
from torch import nn
import torch.nn.functional as F

from models.gradients import scale_gradient
from models.mtl_architectures import TaskStages
from models.weighting import WeightingMethod, loss_logs, sample_mask, task_losses


class SqueezeExcitation(nn.Module):
    """x * sigmoid(W2 relu(W1 avgpool(x))) (Hu et al.), reduction 16 (hidden >= 4 channels)."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        hidden = max(4, channels // reduction)
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.fc2 = nn.Conv2d(hidden, channels, 1)

    def scale(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean(dim=(2, 3), keepdim=True)))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale(x)


class ASTMTNet(TaskStages):
    """``base`` (MultiTaskNet or RoomNet) with a :class:`SqueezeExcitation` per task after every
    encoder stage. ``encode`` is the identity: the encoder runs per task, in ``decode``."""

    architecture = "astmt"
    weightings = ("astmt", "equal", "uncertainty", "dwa")

    def __init__(self, base: nn.Module):
        super().__init__(base)
        # keys "<task>_excite": a bare "class" breaks torch.export's generated code
        self.excite = nn.ModuleDict({f"{t}_excite": nn.ModuleList([SqueezeExcitation(c) for c in self.stage_channels])
                                     for t in self.tasks})

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def task_feature(self, x: torch.Tensor, task: str) -> torch.Tensor:
        """The encoder run for ``task``: every stage's output rescaled by the task's SE module."""
        h = self.stem(x)
        for stage, se in zip(self.base.encoder.stages, self.excite[f"{task}_excite"]):
            h = se(stage(h))
        return h

    def decode_features(self, feats: dict[str, torch.Tensor], image: torch.Tensor | None = None):
        return self.base.decode(feats, image)

    def decode(self, f: torch.Tensor | dict[str, torch.Tensor], image: torch.Tensor | None = None):
        inputs = f if isinstance(f, dict) else {t: f for t in self.tasks}
        return self.base.decode({t: self.task_feature(x, t) for t, x in inputs.items()}, image)


class GradientDiscriminator(nn.Module):
    """ASTMT's fully convolutional discriminator (depth 2, kernel 1): per-pixel task logits."""

    def __init__(self, channels: int, num_tasks: int):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(channels, channels, 1), nn.ReLU(inplace=True),
                                 nn.Conv2d(channels, num_tasks, 1))

    def forward(self, g: torch.Tensor) -> torch.Tensor:
        return self.net(g)


def ganin_alpha(epoch: int, epochs: int) -> float:
    """2 / (1 + exp(-10 (e + 1) / E)) - 1: from ~0 towards 1 over training (Ganin & Lempitsky)."""
    return 2.0 / (1.0 + math.exp(-10.0 * (epoch + 1) / epochs)) - 1.0


class ASTMTTraining(WeightingMethod):
    """ASTMT's adversarial task discriminator on the tasks' feature gradients (module docstring).

    On :class:`ASTMTNet` each task's gradient is taken at its own SE-modulated feature; on the shared
    network (no ``task_feature``) at the one shared feature f. Options: ``disc_weight`` (w, 0.01),
    ``disc_lr`` (Adam, 1e-2: 10x the main lr as ASTMT's ``lr_dscr``)."""

    name = "astmt"

    def __init__(self, tasks, disc_weight: float = 0.01, disc_lr: float = 1e-2):
        super().__init__(tasks)
        self.disc_weight, self.disc_lr = float(disc_weight), float(disc_lr)
        self.alpha = 1.0
        self.discriminator: GradientDiscriminator | None = None
        self.disc_optimizer: torch.optim.Optimizer | None = None

    def setup(self, model, feature_shape):
        if self.discriminator is None:
            self.discriminator = GradientDiscriminator(model.cfg.feature_channels, len(self.tasks))
            self.disc_optimizer = torch.optim.Adam(self.discriminator.parameters(), lr=self.disc_lr)

    def _own_optimizers(self):
        return [self.disc_optimizer] if self.disc_optimizer is not None else []

    def set_epoch(self, epoch: int, epochs: int) -> None:
        self.alpha = ganin_alpha(epoch, epochs)

    def discriminator_input(self, g: torch.Tensor) -> torch.Tensor:
        """g / ||g|| per pixel over channels, through the reversal layer scaled by alpha."""
        return scale_gradient(g / (g.norm(p=2, dim=1, keepdim=True) + 1e-10), -self.alpha)

    def step(self, model, x, targets):
        if self.discriminator is None:
            self.setup(model, None)
        assert self.discriminator is not None
        per_task = hasattr(model, "task_feature")
        decode = getattr(model, "decode_features", model.decode)
        shared = None if per_task else model.encode(x)
        self._zero_own()
        w = self.disc_weight
        total, losses, disc_losses, correct, count = 0.0, {}, [], 0, 0
        for i, t in enumerate(self.tasks):
            f = model.task_feature(x, t) if per_task else shared
            j = task_losses(decode({t: f}, x), targets).get(t)
            if j is None:  # no target for this task in the batch (unlabelled class)
                continue
            losses[t] = j
            (g,) = torch.autograd.grad(j, f, create_graph=True)
            mask = sample_mask(t, targets)
            if mask is not None:
                g = g[mask]
            logits = self.discriminator(self.discriminator_input(g))
            labels = torch.full((logits.shape[0],) + tuple(logits.shape[2:]), i, dtype=torch.long)
            d = F.cross_entropy(logits, labels)
            disc_losses.append(d)
            correct += int((logits.argmax(1) == labels).sum())
            count += labels.numel()
            total = total + (1 - w) * j + w * d
        self._backward_and_step(total)
        logs = loss_logs(losses)
        if disc_losses:
            logs["disc_loss"] = float(sum(disc_losses).detach()) / len(disc_losses)
            logs["disc_acc"] = correct / max(1, count)
        return logs

    def task_weights(self):
        return {t: 1.0 - self.disc_weight for t in self.tasks}
