"""Multi-task loss weighting methods, by name: ``equal``, ``gradnorm``, ``uncertainty``, ``great``.

A registry (``@register_method``) maps a name to a class; the CLI's choices come
from :func:`list_methods`. Every method is an ``nn.Module`` (its state -- loss
normalisers, GAL tensors, auxiliary classifier, task weights -- saves with the
checkpoint) with one job: given a batch, run the forward pass and fill the
``.grad`` of the main network (and of its own parameters). The trainer owns the
main optimizer step; a method steps its own optimizers (aux net, GALs, GradNorm
weights) inside :meth:`step`.

GREAT (Sinha et al., Algorithm 3) is implemented without double backprop, in the
structure of LibMTL's ``rep_grad``: each task's decoder runs on its own detached
copy of the shared feature ``f``; one backward of the normalised losses fills
every decoder's gradients and each copy's ``.grad`` = g_i = dC_i/df; the encoder
then gets ``f.backward(sum_i gamma_i * g_i)``; the auxiliary task classifier sees
``gamma_i * g_i`` and its reversed gradient trains the GALs gamma_i.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import nn
import torch.nn.functional as F

from models.network import TASKS, MultiTaskNet, ResidualBlock
from models.registry import Registry

METHODS: Registry["WeightingMethod"] = Registry("weighting method")
register_method = METHODS.register
list_methods = METHODS.names


def create_method(name: str, tasks: tuple[str, ...] = TASKS, **options: Any) -> "WeightingMethod":
    return METHODS.create(name, tasks, **options)


# --- losses ----------------------------------------------------------------------------------

def task_losses(outputs: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """J_i for every task present in the batch (class only where labels exist, i.e. label >= 0)."""
    losses: dict[str, torch.Tensor] = {}
    if "class" in outputs:
        labels = targets["class"]
        labelled = labels >= 0
        if bool(labelled.any()):
            losses["class"] = F.cross_entropy(outputs["class"][labelled], labels[labelled])
    for t in ("colour", "edges", "denoised"):
        if t in outputs:
            losses[t] = F.mse_loss(outputs[t], targets[t])
    return losses


def sample_mask(task: str, targets: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """Which samples carry a target for ``task`` (None = all)."""
    if task == "class":
        return targets["class"] >= 0
    return None


def poly_multiplier(epoch: int, epochs: int, power: float = 0.9) -> float:
    """The paper's learning-rate multiplier (1 - e / e_max) ^ 0.9."""
    return (1.0 - epoch / max(1, epochs)) ** power


# --- base ------------------------------------------------------------------------------------

class WeightingMethod(nn.Module):
    name = "base"

    def __init__(self, tasks: tuple[str, ...] = TASKS):
        super().__init__()
        self.tasks = tuple(tasks)

    # hooks ------------------------------------------------------------------------------------
    def setup(self, model: MultiTaskNet, feature_shape: torch.Size) -> None:
        """Create shape-dependent state once the shared feature's shape is known (B x C x H x W)."""

    def main_parameters(self) -> list[nn.Parameter]:
        """Own parameters that step with the main optimizer (e.g. uncertainty's log-variances)."""
        return []

    def set_lr_multiplier(self, m: float) -> None:
        """Apply the epoch's poly multiplier to the method's own optimizers."""
        for opt in self._own_optimizers():
            for g in opt.param_groups:
                g["lr"] = g.setdefault("initial_lr", g["lr"]) * m

    def _own_optimizers(self) -> list[torch.optim.Optimizer]:
        return []

    def optim_state(self) -> list[dict]:
        return [o.state_dict() for o in self._own_optimizers()]

    def load_optim_state(self, states: list[dict]) -> None:
        for o, s in zip(self._own_optimizers(), states):
            o.load_state_dict(s)

    def task_weights(self) -> dict[str, float]:
        return {t: 1.0 for t in self.tasks}

    def step(self, model: MultiTaskNet, x: torch.Tensor, targets: dict[str, torch.Tensor]) -> dict[str, float]:
        raise NotImplementedError


# --- equal -----------------------------------------------------------------------------------

@register_method("equal")
class EqualWeighting(WeightingMethod):
    """sum_i J_i: the paper's "Equal" baseline."""

    def step(self, model, x, targets):
        losses = task_losses(model(x), targets)
        total = sum(losses.values())
        total.backward()
        return {f"loss_{t}": float(v.detach()) for t, v in losses.items()}


# --- uncertainty -----------------------------------------------------------------------------

@register_method("uncertainty")
class UncertaintyWeighting(WeightingMethod):
    """Kendall et al.: sum_i J_i / (2 e^{s_i}) + s_i / 2 with learnt s_i = log sigma_i^2.

    :meth:`task_weights` reports 1 / (2 e^{s_i}) normalised to sum to 1, as the GREAT
    paper does for comparison.
    """

    def __init__(self, tasks=TASKS):
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
        losses = task_losses(model(x), targets)
        self.weighted_total(losses).backward()
        return {f"loss_{t}": float(v.detach()) for t, v in losses.items()}

    def task_weights(self):
        w = 1.0 / (2 * torch.exp(self.log_vars.detach()))
        w = w / w.sum()
        return {t: float(v) for t, v in zip(self.tasks, w)}


# --- shared machinery for methods that work on per-task feature gradients ----------------------

def per_task_feature_gradients(model: MultiTaskNet, x: torch.Tensor, targets: dict[str, torch.Tensor],
                               scale: Callable[[str, torch.Tensor], torch.Tensor]
                               ) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Encoder forward, then every decoder on its own detached copy of f, then ONE backward of
    ``sum_i scale(i, J_i)``: decoder grads are filled and ``copies[i].grad`` = d scale(i, J_i) / df.

    Returns (f with its graph, losses J_i, per-task gradients at f).
    """
    f = model.encode(x)
    copies = {t: f.detach().requires_grad_(True) for t in TASKS}
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

    def update(self, losses: dict[str, torch.Tensor]) -> None:
        for i, t in enumerate(self.tasks):
            if t in losses and math.isnan(float(self.initial[i])):
                self.initial[i] = max(float(losses[t].detach()), 1e-8)

    def __getitem__(self, task: str) -> torch.Tensor:
        return self.initial[self.tasks.index(task)].clone()  # a copy: later updates are in place

    def as_dict(self) -> dict[str, float | None]:
        return {t: (None if math.isnan(float(v)) else float(v)) for t, v in zip(self.tasks, self.initial)}


# --- GradNorm --------------------------------------------------------------------------------

@register_method("gradnorm")
class GradNorm(WeightingMethod):
    """Chen et al. 2018. Task weights w_i scale the losses; they are trained to make the
    gradient norms G_i = ||d(w_i J_i)/dW|| at the last shared layer W approach
    mean(G) * r_i^alpha, with r_i the relative inverse training rate (J_i / J_i^0 over its
    mean). After each step the weights are renormalised to sum to the number of tasks.
    """

    def __init__(self, tasks=TASKS, alpha: float = 0.6, weight_lr: float = 1e-3):
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
        w = self.weights.detach()
        f, losses, grads = per_task_feature_gradients(
            model, x, targets, lambda t, j: w[self.tasks.index(t)] * j)
        self.normalisers.update(losses)
        W = self.shared_layer(model)
        norms = {}
        for t, gw in grads.items():  # ||dJ_t/dW||: a short backward from f to W per task
            g_unweighted = gw / w[self.tasks.index(t)]
            (dW,) = torch.autograd.grad(f, W, grad_outputs=g_unweighted, retain_graph=True)
            norms[t] = dW.norm()
        f.backward(sum(grads.values()))  # encoder: d(sum_i w_i J_i)/dtheta
        self.weight_optimizer.zero_grad(set_to_none=True)
        lgrad = self.gradnorm_loss(losses, norms)
        lgrad.backward(inputs=[self.weights])
        self.weight_optimizer.step()
        with torch.no_grad():  # renormalise: sum_i w_i = number of tasks, weights stay positive
            self.weights.clamp_(min=1e-3)
            self.weights.mul_(len(self.tasks) / self.weights.sum())
        logs = {f"loss_{t}": float(v.detach()) for t, v in losses.items()}
        logs["gradnorm_loss"] = float(lgrad.detach())
        return logs

    def task_weights(self):
        return {t: float(v) for t, v in zip(self.tasks, self.weights.detach())}


# --- GREAT -----------------------------------------------------------------------------------

class GradientReversal(torch.autograd.Function):
    """Identity forward; multiplies the incoming gradient by -1 backward."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -grad


def reverse_gradient(x: torch.Tensor) -> torch.Tensor:
    return GradientReversal.apply(x)


class GradientAlignmentLayers(nn.Module):
    """gamma_i, one C x H x W tensor per task, initialised to ones and kept above ``floor``.

    GALs act in the backward pass only: the encoder receives sum_i gamma_i * g_i instead of
    sum_i g_i, while every forward pass (training and inference) is y_i = D_i(f). Hence
    :meth:`forward_identity` -- what a GAL does to activations -- is the identity.
    """

    def __init__(self, tasks: tuple[str, ...], feature_shape: tuple[int, int, int], floor: float = 1e-3):
        super().__init__()
        self.tasks = tasks
        self.floor = floor
        self.gamma = nn.Parameter(torch.ones((len(tasks),) + tuple(feature_shape)))

    @staticmethod
    def forward_identity(f: torch.Tensor) -> torch.Tensor:
        return f

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


def normalise_per_sample(g: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """g / RMS(g) per sample: feature gradients are tiny (~1e-6); the classifier sees unit scale."""
    rms = g.flatten(1).pow(2).mean(1).add(eps).sqrt()
    return g / rms.view(-1, *([1] * (g.dim() - 1)))


@register_method("great")
class GREAT(WeightingMethod):
    """Gradient adversarial training with gradient-alignment layers (Algorithm 3).

    Options: ``aux_lr`` (Adam, the paper: 1e-3), ``gal_lr`` (Adam; low keeps gamma positive),
    ``gal_floor`` (clamp), ``aux_norm`` ("rms": per-sample RMS normalisation of the classifier
    input, or "none": the raw gamma_i * g_i -- an implementation choice the paper leaves open).
    """

    def __init__(self, tasks=TASKS, aux_lr: float = 1e-3, gal_lr: float = 1e-4, gal_floor: float = 1e-3,
                 aux_norm: str = "rms"):
        super().__init__(tasks)
        if aux_norm not in ("rms", "none"):
            raise ValueError(f"aux_norm must be 'rms' or 'none', got {aux_norm!r}")
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
        self.aux = AuxiliaryTaskClassifier(c, len(self.tasks), stride=2 if min(h, w) >= 4 else 1)
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
        # C_i = J_i / J_i^0 (J^0 fixed, detached, at the first batch a task appears in)
        normalisers = self.normalisers

        def scale(t: str, j: torch.Tensor) -> torch.Tensor:
            normalisers.update({t: j})
            return j / normalisers[t]

        f, losses, grads = per_task_feature_gradients(model, x, targets, scale)
        f.backward(self.gals.align(grads))  # encoder: sum_i gamma_i * g_i
        # auxiliary task classifier (descends C') and GALs (ascend C' through the reversal)
        self.aux_optimizer.zero_grad(set_to_none=True)
        self.gal_optimizer.zero_grad(set_to_none=True)
        inp, labels = self.aux_inputs(grads, targets)
        logits = self.aux(inp)
        aux_loss = F.cross_entropy(logits, labels)
        aux_loss.backward()
        self.aux_optimizer.step()
        self.gal_optimizer.step()
        self.gals.clamp_()
        logs = {f"loss_{t}": float(v.detach()) for t, v in losses.items()}
        logs["aux_loss"] = float(aux_loss.detach())
        logs["aux_acc"] = float((logits.argmax(1) == labels).float().mean())
        logs["gamma_mean"] = float(self.gals.gamma.detach().mean())
        return logs

    def task_weights(self):
        if self.gals is None:
            return {t: 1.0 for t in self.tasks}
        return {t: float(self.gals.gamma[i].detach().mean()) for i, t in enumerate(self.tasks)}
