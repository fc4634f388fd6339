"""GREAT as a multi-task loss weighting (Sinha et al., Algorithm 3), registered as ``great``.

Implemented without double backprop, in the structure of LibMTL's ``rep_grad``: each task's
decoder runs on its own detached copy of the shared feature ``f``; one backward of the
normalised losses fills every decoder's gradients and each copy's ``.grad`` = g_i = dC_i/df;
the encoder then gets ``f.backward(sum_i gamma_i * g_i)``; the auxiliary task classifier sees
``gamma_i * g_i`` and its reversed gradient trains the GALs gamma_i.
"""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from shared.errors import UserError

from models.gradients import normalise_per_sample, reverse_gradient
from models.network import ResidualBlock
from models.weighting import LossNormalisers, WeightingMethod, loss_logs, per_task_feature_gradients, sample_mask


class GradientAlignmentLayers(nn.Module):
    """gamma_i, one C x H x W tensor per task, initialised to ones and kept above ``floor``.

    GALs act in the backward pass only: the encoder receives sum_i gamma_i * g_i instead of
    sum_i g_i, while every forward pass (training and inference) is y_i = D_i(f).
    """

    def __init__(self, tasks: tuple[str, ...], feature_shape: tuple[int, int, int], floor: float = 1e-3):
        super().__init__()
        self.tasks = tasks
        self.floor = floor
        self.gamma = nn.Parameter(torch.ones((len(tasks),) + tuple(feature_shape)))

    def align(self, grads: dict[str, torch.Tensor]) -> torch.Tensor:
        """sum_i gamma_i * g_i (gamma detached: the encoder does not train the GALs)."""
        gamma = self.gamma.detach()
        return sum(gamma[self.tasks.index(t)] * g for t, g in grads.items())

    def clamp_(self) -> None:
        with torch.no_grad():
            self.gamma.clamp_(min=self.floor)


class AuxiliaryTaskClassifier(nn.Module):
    """The paper's ResNet-11 task classifier: a conv, 4 residual blocks with channels halved
    each block (from C), leaky-ReLU 0.2, global pooling and a linear layer (N-way).

    The first conv has stride 2 when the feature map is at least 4x4 (as the paper does for
    its 64x64 inputs): it sees B x N samples per step, and this keeps it ~10 % of a step.
    """

    def __init__(self, in_channels: int, num_tasks: int, stride: int = 2):
        super().__init__()
        chans = [max(8, in_channels >> i) for i in range(5)]
        self.stem = nn.Sequential(nn.Conv2d(in_channels, chans[0], 3, stride, 1, bias=False),
                                  nn.BatchNorm2d(chans[0]), nn.LeakyReLU(0.2))
        self.blocks = nn.Sequential(*[ResidualBlock(chans[i], chans[i + 1], 1, "leaky") for i in range(4)])
        self.fc = nn.Linear(chans[4], num_tasks)

    def forward(self, g: torch.Tensor) -> torch.Tensor:
        return self.fc(self.blocks(self.stem(g)).mean(dim=(2, 3)))


class GreatWeighting(WeightingMethod):
    """Gradient adversarial training with gradient-alignment layers (Algorithm 3).

    Options: ``aux_lr`` (Adam, the paper: 1e-3), ``gal_lr`` (Adam; low keeps gamma positive),
    ``gal_floor`` (clamp), ``aux_norm`` ("none", the default: the raw gamma_i * g_i, as the
    paper; or "rms": per-sample RMS normalisation of the classifier input. With "rms" the aux
    loss's gradient on each GAL is orthogonal to the GAL -- a sample's scale no longer reaches the
    classifier -- so the GALs can reshape a task's gradient but never rescale it), ``aux_stride``
    (the classifier's first conv: None, the default, strides 2 when the feature map is at least
    4x4; 1 is the paper's ResNet-11, which states no stride; README, "Paper vs this implementation").
    """

    name = "great"

    def __init__(self, tasks, aux_lr: float = 1e-3, gal_lr: float = 1e-4, gal_floor: float = 1e-3,
                 aux_norm: str = "none", aux_stride: int | None = None):
        super().__init__(tasks)
        if aux_norm not in ("rms", "none"):
            raise UserError(f"aux_norm must be 'rms' or 'none', got {aux_norm!r}")
        if aux_stride not in (None, 1, 2):
            raise UserError(f"aux_stride must be 1 or 2, got {aux_stride!r}")
        self.aux_stride = aux_stride
        self.aux_lr, self.gal_lr, self.gal_floor, self.aux_norm = aux_lr, gal_lr, gal_floor, aux_norm
        self.normalisers = LossNormalisers(self.tasks)
        self.gals: GradientAlignmentLayers | None = None
        self.aux: AuxiliaryTaskClassifier | None = None
        self.aux_optimizer: torch.optim.Optimizer | None = None
        self.gal_optimizer: torch.optim.Optimizer | None = None

    def setup(self, model, feature_shape):
        c, h, w = tuple(feature_shape)[1:]
        if self.gals is not None:
            if tuple(self.gals.gamma.shape[1:]) != (c, h, w):
                raise ValueError(f"GALs were built for a {tuple(self.gals.gamma.shape[1:])} feature, "
                                 f"this batch gives {(c, h, w)}: train GREAT at one input size")
            return
        self.gals = GradientAlignmentLayers(self.tasks, (c, h, w), self.gal_floor)
        stride = self.aux_stride if self.aux_stride is not None else (2 if min(h, w) >= 4 else 1)
        # on N ranks its BatchNorms see the whole batch of classifier samples (models/distributed.py)
        self.aux = self.data_parallel.convert_batchnorm(AuxiliaryTaskClassifier(c, len(self.tasks), stride=stride))
        self.aux_optimizer = torch.optim.Adam(self.aux.parameters(), lr=self.aux_lr)
        self.gal_optimizer = torch.optim.Adam(self.gals.parameters(), lr=self.gal_lr)

    def _own_optimizers(self):
        return [o for o in (self.aux_optimizer, self.gal_optimizer) if o is not None]

    def aux_inputs(self, grads: dict[str, torch.Tensor], targets: dict[str, torch.Tensor],
                   reverse: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """The classifier's samples gamma_i * g_i (one per sample that has task i's target) and
        labels i. Gamma passes through the gradient-reversal layer: it ascends the aux loss."""
        assert self.gals is not None
        gamma = reverse_gradient(self.gals.gamma) if reverse else self.gals.gamma
        inputs, labels = [], []
        for t, g in grads.items():
            i = self.tasks.index(t)
            mask = sample_mask(t, targets)
            g = g.detach() if mask is None else g.detach()[mask]
            inputs.append(gamma[i] * g)
            labels.append(torch.full((len(g),), i, dtype=torch.long))
        inp = torch.cat(inputs)
        if self.aux_norm == "rms":
            inp = normalise_per_sample(inp)
        return inp, torch.cat(labels)

    def step(self, model, x, targets):
        if self.gals is None:
            self.setup(model, model.encode(x[:1]).shape)
        assert self.gals is not None and self.aux is not None
        # C_i = J_i / J_i^0 (J^0 fixed, detached, at the first batch a task appears in: the whole batch's)
        normalisers, dp = self.normalisers, self.data_parallel

        def scale(t: str, j: torch.Tensor) -> torch.Tensor:
            normalisers.update({t: j}, mean=dp.mean)
            return j / normalisers[t]

        f, losses, grads = per_task_feature_gradients(model, x, targets, self.tasks, scale)
        # encoder: sum_i gamma_i * g_i (on N ranks, world x the whole batch's rows: the ranks' grads are averaged)
        f.backward(self.gals.align(grads))
        # auxiliary task classifier (descends C') and GALs (ascend C' through the reversal). Its samples are
        # the whole batch's per-sample g_i: a rank's loss is a mean over its 1/world shard, so its g_i are
        # world x those (shard correction)
        self._zero_own()
        inp, labels = self.aux_inputs(grads if dp.world == 1 else {t: g / dp.world for t, g in grads.items()}, targets)
        logits = self.aux(inp)
        aux_loss = F.cross_entropy(logits, labels)
        aux_loss.backward()
        dp.average_gradients(list(self.aux.parameters()) + list(self.gals.parameters()))
        for opt in self._own_optimizers():
            opt.step()
        self.gals.clamp_()
        logs = loss_logs(losses)
        logs["aux_loss"] = float(aux_loss.detach())
        logs["aux_acc"] = float((logits.argmax(1) == labels).float().mean())
        logs["gamma_mean"] = float(self.gals.gamma.detach().mean())
        return logs

    def task_weights(self):
        if self.gals is None:
            return {t: 1.0 for t in self.tasks}
        return {t: float(self.gals.gamma[i].detach().mean()) for i, t in enumerate(self.tasks)}
