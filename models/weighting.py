"""Multi-task loss weighting methods: ``equal``, ``uncertainty``, ``gradnorm`` here, ``great`` in
:mod:`models.weighting_great`; registered by name in :mod:`models.registry`.

Every method is an ``nn.Module`` (its state -- loss normalisers, GAL tensors, auxiliary
classifier, task weights, its own optimizers -- saves with the checkpoint) over a task tuple
given at construction (any subset or order of the network's heads), with one job: given a
batch, run the forward pass and fill the ``.grad`` of the main network (and of its own
parameters). The training engine owns the main optimizer step; a method steps its own
optimizers (aux net, GALs, GradNorm weights) inside :meth:`step`.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn
import torch.nn.functional as F

from models.network import MultiTaskNet
from models.own_optimizers import OwnOptimizers
from models.room_tasks import normals_loss


# --- losses ----------------------------------------------------------------------------------

def task_losses(outputs: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """J_i for every task in ``outputs`` present in the batch: cross-entropy for ``class`` (only
    where labels exist, i.e. label >= 0), 1 - |cos| for the room set's ``normals``, mean squared
    error for the other dense tasks (colour, edges, denoised; depth, keypoint heatmaps)."""
    losses: dict[str, torch.Tensor] = {}
    for t, out in outputs.items():
        if t == "class":
            labels = targets["class"]
            labelled = labels >= 0
            if bool(labelled.any()):
                losses["class"] = F.cross_entropy(out[labelled], labels[labelled])
        elif t == "normals":
            losses[t] = normals_loss(out, targets[t])
        else:
            losses[t] = F.mse_loss(out, targets[t])
    return losses


def sample_mask(task: str, targets: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """Which samples carry a target for ``task`` (None = all)."""
    if task == "class":
        return targets["class"] >= 0
    return None


def loss_logs(losses: dict[str, torch.Tensor]) -> dict[str, float]:
    return {f"loss_{t}": float(v.detach()) for t, v in losses.items()}


# --- base ------------------------------------------------------------------------------------

class SingleProcess:
    """The data-parallel run a weighting is part of (:attr:`WeightingMethod.data_parallel`); here
    one process, so nothing to reduce. :class:`models.distributed.Replica` is the N-rank one: its
    losses are shard means, so a rank's per-sample gradients are ``world`` x the whole batch's."""

    world = 1

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` averaged over the ranks."""
        return t

    def average_gradients(self, params: list[torch.Tensor]) -> None:
        """Every parameter's ``.grad`` averaged over the ranks."""

    def convert_batchnorm(self, module: nn.Module) -> nn.Module:
        """``module`` with every BatchNorm2d computing the whole batch's statistics."""
        return module


class WeightingMethod(OwnOptimizers):
    name = "base"
    data_parallel: SingleProcess = SingleProcess()  # set by models.train for a rank of `--nproc N`

    def __init__(self, tasks: tuple[str, ...]):
        super().__init__()
        self.tasks = tuple(tasks)

    def setup(self, model: MultiTaskNet, feature_shape: torch.Size) -> None:
        """Create shape-dependent state once the shared feature's shape is known (B x C x H x W)."""

    def main_parameters(self) -> list[nn.Parameter]:
        """Own parameters that step with the main optimizer (e.g. uncertainty's log-variances)."""
        return []

    def task_weights(self) -> dict[str, float]:
        return {t: 1.0 for t in self.tasks}

    def set_epoch(self, epoch: int, epochs: int) -> None:
        """Called by the training loop at the start of every epoch (DWA's epoch losses, ASTMT's alpha)."""

    def outputs(self, model: MultiTaskNet, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The heads of this method's tasks on ``x`` (one encoder forward)."""
        f = model.encode(x)
        return model.decode({t: f for t in self.tasks}, x)

    def step(self, model: MultiTaskNet, x: torch.Tensor, targets: dict[str, torch.Tensor]) -> dict[str, float]:
        raise NotImplementedError


class EqualWeighting(WeightingMethod):
    """sum_i J_i: the paper's "Equal" baseline."""

    name = "equal"

    def step(self, model, x, targets):
        losses = task_losses(self.outputs(model, x), targets)
        total = sum(losses.values())
        total.backward()
        return loss_logs(losses)


class UncertaintyWeighting(WeightingMethod):
    """Kendall et al.: sum_i J_i / (2 e^{s_i}) + s_i / 2 with learnt s_i = log sigma_i^2.

    :meth:`task_weights` reports 1 / (2 e^{s_i}) normalised to sum to 1, as the GREAT
    paper does for comparison.
    """

    name = "uncertainty"

    def __init__(self, tasks):
        super().__init__(tasks)
        self.log_vars = nn.Parameter(torch.zeros(len(self.tasks)))

    def main_parameters(self):
        return [self.log_vars]

    def weighted_total(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        total = 0.0
        for i, t in enumerate(self.tasks):
            if t in losses:
                s = self.log_vars[i]
                total = total + losses[t] / (2 * torch.exp(s)) + s / 2
        return total

    def step(self, model, x, targets):
        losses = task_losses(self.outputs(model, x), targets)
        self.weighted_total(losses).backward()
        return loss_logs(losses)

    def task_weights(self):
        w = 1.0 / (2 * torch.exp(self.log_vars.detach()))
        w = w / w.sum()
        return {t: float(v) for t, v in zip(self.tasks, w)}


# --- shared machinery for methods that work on per-task feature gradients ----------------------

def per_task_feature_gradients(model: MultiTaskNet, x: torch.Tensor, targets: dict[str, torch.Tensor],
                               tasks: tuple[str, ...], scale: Callable[[str, torch.Tensor], torch.Tensor]
                               ) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Encoder forward, then every task's decoder on its own detached copy of f, then ONE
    backward of ``sum_i scale(i, J_i)``: decoder grads are filled and ``copies[i].grad`` =
    d scale(i, J_i) / df (LibMTL's ``rep_grad``).

    Returns (f with its graph, losses J_i, per-task gradients at f).
    """
    f = model.encode(x)
    copies = {t: f.detach().requires_grad_(True) for t in tasks}
    losses = task_losses(model.decode(copies, x), targets)
    total = sum(scale(t, j) for t, j in losses.items())
    total.backward()
    grads = {t: copies[t].grad for t in losses}
    return f, losses, grads


class LossNormalisers(nn.Module):
    """J_i^0: each task's first observed loss (detached), saved with the checkpoint."""

    def __init__(self, tasks: tuple[str, ...]):
        super().__init__()
        self.tasks = tasks
        self.register_buffer("initial", torch.full((len(tasks),), float("nan")))

    def update(self, losses: dict[str, torch.Tensor], mean: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> None:
        """Record J_i^0 for tasks seen for the first time; ``mean`` makes a rank's shard loss the whole
        batch's (:meth:`SingleProcess.mean`; every rank records the same tasks at the same step)."""
        for i, t in enumerate(self.tasks):
            if t in losses and math.isnan(float(self.initial[i])):
                self.initial[i] = max(float(mean(losses[t].detach())), 1e-8)

    def __getitem__(self, task: str) -> torch.Tensor:
        return self.initial[self.tasks.index(task)].clone()  # a copy: later updates are in place

    def as_dict(self) -> dict[str, float | None]:
        return {t: (None if math.isnan(float(v)) else float(v)) for t, v in zip(self.tasks, self.initial)}


class GradNorm(WeightingMethod):
    """Chen et al. 2018. Task weights w_i scale the losses; they are trained to make the
    gradient norms G_i = ||d(w_i J_i)/dW|| at the last shared layer W approach
    mean(G) * r_i^alpha, with r_i the relative inverse training rate (J_i / J_i^0 over its
    mean). After each step the weights are renormalised to sum to the number of tasks.
    """

    name = "gradnorm"

    def __init__(self, tasks, alpha: float = 0.6, weight_lr: float = 1e-3):
        super().__init__(tasks)
        self.alpha = float(alpha)
        self.weights = nn.Parameter(torch.ones(len(self.tasks)))
        self.normalisers = LossNormalisers(self.tasks)
        self.weight_optimizer = torch.optim.Adam([self.weights], lr=weight_lr)

    def _own_optimizers(self):
        return [self.weight_optimizer]

    @staticmethod
    def shared_layer(model: MultiTaskNet) -> torch.Tensor:
        """W: the last convolution's weight in the shared encoder."""
        return model.encoder.stages[-1][-1].conv2.weight

    def gradnorm_loss(self, losses: dict[str, torch.Tensor], norms: dict[str, torch.Tensor]) -> torch.Tensor:
        """L_grad = sum_i |G_i - sg(mean(G) r_i^alpha)| over the tasks present, with G_i = w_i ||dJ_i/dW||."""
        present = [t for t in self.tasks if t in losses]
        idx = torch.tensor([self.tasks.index(t) for t in present])
        w = self.weights[idx]
        g = w * torch.stack([norms[t] for t in present]).detach()
        ratio = torch.stack([losses[t].detach() / self.normalisers[t] for t in present])
        r = ratio / ratio.mean()
        target = (g.mean() * r ** self.alpha).detach()
        return (g - target).abs().sum()

    def step(self, model, x, targets):
        dp = self.data_parallel  # on N ranks, norms and loss ratios are the whole batch's (models/distributed.py)
        w = self.weights.detach()
        f, losses, grads = per_task_feature_gradients(
            model, x, targets, self.tasks, lambda t, j: w[self.tasks.index(t)] * j)
        whole = dict(zip(losses, dp.mean(torch.stack([j.detach() for j in losses.values()]))))
        self.normalisers.update(whole)
        W = self.shared_layer(model)
        dWs = []
        for t, gw in grads.items():  # dJ_t/dW: a short backward from f to W per task
            g_unweighted = gw / w[self.tasks.index(t)]
            dWs.append(torch.autograd.grad(f, W, grad_outputs=g_unweighted, retain_graph=True)[0])
        norms = {t: dW.norm() for t, dW in zip(grads, dp.mean(torch.stack(dWs)))}  # ranks' dW averaged, then ||.||
        f.backward(sum(grads.values()))  # encoder: d(sum_i w_i J_i)/dtheta
        self.weight_optimizer.zero_grad(set_to_none=True)
        lgrad = self.gradnorm_loss(whole, norms)
        lgrad.backward(inputs=[self.weights])
        dp.average_gradients([self.weights])
        self.weight_optimizer.step()
        with torch.no_grad():  # renormalise: sum_i w_i = number of tasks, weights stay positive
            self.weights.clamp_(min=1e-3)
            self.weights.mul_(len(self.tasks) / self.weights.sum())
        logs = loss_logs(losses)
        logs["gradnorm_loss"] = float(lgrad.detach())
        return logs

    def task_weights(self):
        return {t: float(v) for t, v in zip(self.tasks, self.weights.detach())}
