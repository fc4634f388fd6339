"""Adversarial defences: ``none``, ``fgsm-at``, ``great``, ``greace``, ``great+ce`` (registered in
:mod:`models.registry`).

GREAT / GREACE follow the paper's Algorithm 1:

* masked input gradient g = d J_bar / dx: the cross-entropy's logit gradient masked to
  the true class, (softmax(a) - onehot(y)) * onehot(y) (:func:`masked_grad_outputs`), taken to
  x per sample; so g = (p_y - 1) * d a_y / dx (:mod:`models.input_gradients`);
* an auxiliary classifier A (a copy of the main network, leaky-ReLU 0.2: the paper's) classifies
  g as it is (no normalisation, the paper's; ``aux_norm="rms"`` is a flag) into y;
* ``great``: A descends CE(A(g), y); the main network gets -alpha * dCE(A(g), y)/dtheta
  through g (double backprop). Both come from ONE backward: g enters A through
  :func:`models.gradients.scale_gradient` (identity forward, gradient times -alpha);
* ``greace``: eq. 6 adds beta * softmax(a')_k (a' = A's logits) to the cross-entropy's logit
  gradient on the negative classes; ``greace="literal"`` adds exactly that, the default
  ``"reweight"`` re-weights the cross-entropy's own negative-class gradient to (1 + beta p'_k) p_k
  (the literal term collapses training at the patent's beta 20: see :mod:`models.greace`, README);
* schedules alpha = alpha_max (1 - m), beta = beta_max (1 - m), m = (1 - e/e_max)^0.9.
  While alpha = 0 (epoch 0) g is taken without a graph: no double backprop is paid for.

Defaults are the paper's; the faster variants are flags (README, "Paper vs this implementation";
measured with ``python -m models.bench_robust --compare-faithful`` / ``hmd bench train``):

* ``input_grad="explicit"`` (default, not a deviation): for our ``resnet`` / ``cnn5`` classifiers g
  is built from explicit differentiable ops (:func:`models.input_gradients.forward_with_input_vjp`:
  transposed convolutions, the BN and activation derivatives) instead of
  ``autograd.grad(create_graph=True)``. Same values and same second derivatives (tests pin both);
  on CPU autograd's double backward of a convolution is a slow large-kernel convolution, the
  explicit one a weight-gradient kernel. Other networks (e.g. the multi-task class head) fall
  back to autograd.
* ``aux_width`` (default: the main network's width, the paper's "copy of the main network").
  ``--aux-width W`` with W < the main width is a faster flag (half width: the aux costs a quarter).
* ``grad_bn="batch"`` (default, :data:`models.input_gradients.DEFAULT_GRAD_BN`): the exact maths,
  the batch statistics' cross-sample terms differentiated inside g, as autograd on the train-mode
  network gives them. ``grad_bn="detached"`` is a faster flag: g is taken with the BN layers' batch
  statistics held constant (the per-sample gradient of the network normalised with this batch's
  statistics), and the double backprop does not differentiate them. In eval mode both are the same.
* ``aux_norm="none"`` (default, the paper's); ``"rms"`` normalises each g to unit RMS first.

``fgsm-at`` is the paper's adversarial-training baseline: each sample of the batch is
replaced by its FGSM example (eps 0.2, generated with frozen BN statistics) with
probability 0.5 and the loss is the batch-mean cross-entropy, i.e. 0.5 (L_clean + L_adv)
in expectation, at the cost of one extra forward/backward.

A defence is an ``nn.Module`` (the auxiliary classifier and its optimizer state save
with it). :meth:`Defence.train_step` fills the main network's ``.grad`` (accumulating) and
steps the defence's own optimizer; the caller owns the main optimizer.
:func:`create_class_defence` adapts a defence to the multi-task network's class head
for ``hmd train --defence``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch
from torch import nn
import torch.nn.functional as F

from shared.errors import UserError

from models.attacks import fgsm_step
from models.batchnorm import FrozenBatchNormStats
from models.classifier import aux_copy_config
from models.gradients import normalise_per_sample, scale_gradient
from models.input_gradients import DEFAULT_GRAD_BN, GRAD_BN_CHOICES, INPUT_GRAD_CHOICES, logits_and_input_vjp
from models.greace import DEFAULT_GREACE, GREACE_VARIANTS, greace_loss
from models.network import NetConfig
from models.own_optimizers import OwnOptimizers
from models.registry import check_choice, create_classifier, create_defence
from models.schedules import poly_multiplier, ramp

LogitsFn = Callable[[torch.Tensor], torch.Tensor]


# --- the maths ------------------------------------------------------------------------------

def masked_grad_outputs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(softmax(a) - onehot(y)) * onehot(y): the cross-entropy's logit gradient masked to the true class."""
    onehot = F.one_hot(labels, logits.shape[1]).to(logits.dtype)
    return (torch.softmax(logits, 1) - onehot) * onehot




# --- defences -------------------------------------------------------------------------------

class Defence(OwnOptimizers):
    name = "base"

    def __init__(self, net_cfg: NetConfig, seed: int = 0, **_: Any):
        # options meant for other defences (the CLI passes one set to all) are ignored
        super().__init__()
        self.net_cfg = net_cfg
        self.generator = torch.Generator().manual_seed(seed)

    def set_epoch(self, epoch: float, epochs: int) -> None:
        """Called once per epoch before its first step (schedules, own lr multiplier)."""

    def loss(self, logits_fn: LogitsFn, x: torch.Tensor, y: torch.Tensor,
             include_ce: bool = True) -> tuple[torch.Tensor, dict[str, float]]:
        """The main network's training loss (``include_ce=False``: only what the defence adds)."""
        raise NotImplementedError

    def train_step(self, logits_fn: LogitsFn, x: torch.Tensor, y: torch.Tensor,
                   include_ce: bool = True) -> dict[str, float]:
        """Backward of :meth:`loss` (accumulates into the main grads) and the defence's own steps."""
        self._zero_own()
        total, logs = self.loss(logits_fn, x, y, include_ce)
        self._backward_and_step(total)
        return logs


class NoDefence(Defence):
    """Plain cross-entropy: the undefended baseline."""

    name = "none"

    def loss(self, logits_fn, x, y, include_ce=True):
        if not include_ce:
            return torch.zeros(()), {}
        ce = F.cross_entropy(logits_fn(x), y)
        return ce, {"ce": float(ce.detach())}


class FGSMAdversarialTraining(Defence):
    """Clean or FGSM (eps) sample with equal probability, batch-mean CE = 0.5 (L_clean + L_adv).

    In the multi-task hook (``include_ce=False``) the weighting method owns the clean loss, so
    this adds the CE of the FGSM examples of the whole labelled batch."""

    name = "fgsm-at"

    def __init__(self, net_cfg, seed: int = 0, eps: float = 0.2, **_: Any):
        super().__init__(net_cfg, seed)
        if not 0.0 <= float(eps) <= 1.0:
            raise UserError(f"--fgsm-eps {eps}: must be in [0, 1]")
        self.eps = float(eps)

    def loss(self, logits_fn, x, y, include_ce=True):
        with FrozenBatchNormStats(_module_of(logits_fn)):
            x_adv = fgsm_step(logits_fn, x, y, self.eps)
        if not include_ce:
            adv = F.cross_entropy(logits_fn(x_adv), y)
            return adv, {"ce_adv": float(adv.detach())}
        use_adv = torch.rand(len(y), generator=self.generator) < 0.5
        x_mix = torch.where(use_adv.view(-1, *([1] * (x.dim() - 1))), x_adv, x)
        ce = F.cross_entropy(logits_fn(x_mix), y)
        return ce, {"ce": float(ce.detach()), "adv_fraction": float(use_adv.float().mean())}


def _module_of(logits_fn: LogitsFn) -> nn.Module:
    if isinstance(logits_fn, nn.Module):
        return logits_fn
    module = getattr(logits_fn, "module", None)
    if not isinstance(module, nn.Module):
        raise TypeError("logits_fn must be an nn.Module or carry one as .module")
    return module


class GradientAdversarialDefence(Defence):
    """GREAT and/or GREACE (Algorithm 1). Options: ``alpha_max`` (1), ``beta_max`` (2 CIFAR-10,
    10 SVHN, 20 MNIST), ``greace`` (a reading of eq. 6, :data:`models.greace.GREACE_VARIANTS`),
    ``aux_lr`` (Adam, 1e-3), ``aux_norm`` ("none", the paper's, or "rms" per-sample normalisation
    of g), ``aux_width`` (None = the main network's width, the paper's copy), ``aux_arch``
    ("resnet"), ``input_grad`` ("explicit" / "autograd") and ``grad_bn`` ("batch", the paper's, /
    "detached"), see the module docstring."""

    reversal = True
    greace = True

    def __init__(self, net_cfg: NetConfig, seed: int = 0, alpha_max: float = 1.0, beta_max: float = 2.0,
                 aux_lr: float = 1e-3, aux_norm: str = "none", aux_width: int | None = None,
                 aux_arch: str = "resnet", input_grad: str = "explicit", grad_bn: str = DEFAULT_GRAD_BN,
                 greace: str = DEFAULT_GREACE, **_: Any):
        super().__init__(net_cfg, seed)
        self.greace_variant = check_choice("greace", greace, GREACE_VARIANTS)
        self.grad_bn = check_choice("grad_bn", grad_bn, GRAD_BN_CHOICES)
        self.input_grad = check_choice("input_grad", input_grad, INPUT_GRAD_CHOICES)
        self.aux_norm = check_choice("aux_norm", aux_norm, ("rms", "none"))
        self.alpha_max = float(alpha_max) if self.reversal else 0.0
        self.beta_max = float(beta_max) if self.greace else 0.0
        if aux_width is not None and int(aux_width) < 1:
            raise UserError(f"aux width must be >= 1, got {aux_width}")
        aux_cfg = aux_copy_config(net_cfg)
        aux_cfg = dataclasses.replace(aux_cfg, width=int(aux_width or net_cfg.width))
        self.aux = create_classifier(aux_arch, aux_cfg)
        self.aux_optimizer = torch.optim.Adam(self.aux.parameters(), lr=aux_lr)
        self.alpha, self.beta = 0.0, 0.0

    def _own_optimizers(self):
        return [self.aux_optimizer]

    def set_epoch(self, epoch, epochs):
        self.set_lr_multiplier(poly_multiplier(epoch, epochs))  # the aux net follows the main lr policy
        self.alpha = ramp(self.alpha_max, epoch, epochs)
        self.beta = ramp(self.beta_max, epoch, epochs)

    def loss(self, logits_fn, x, y, include_ce=True):
        double_backprop = self.alpha > 0.0
        logits, g = logits_and_input_vjp(logits_fn, x, y, masked_grad_outputs, double_backprop, self.input_grad,
                                         self.grad_bn)
        aux_in = normalise_per_sample(g) if self.aux_norm == "rms" else g
        # one aux forward/backward: theta' descends CE(A(g), y); theta gets -alpha * its gradient
        aux_logits = self.aux(scale_gradient(aux_in, -self.alpha) if double_backprop else aux_in)
        aux_loss = F.cross_entropy(aux_logits, y)
        total = aux_loss
        logs = {"aux_loss": float(aux_loss.detach()),
                "aux_acc": float((aux_logits.detach().argmax(1) == y).float().mean()),
                "alpha": self.alpha, "beta": self.beta}
        if include_ce:
            ce = F.cross_entropy(logits, y)
            total = total + ce
            logs["ce"] = float(ce.detach())
        if self.beta > 0.0:
            total = total + greace_loss(self.greace_variant, logits, aux_logits, y, self.beta)
        return total, logs


class GreatDefence(GradientAdversarialDefence):
    name = "great"
    reversal, greace = True, False


class GreaceDefence(GradientAdversarialDefence):
    name = "greace"
    reversal, greace = False, True


class GreatPlusCEDefence(GradientAdversarialDefence):
    name = "great+ce"
    reversal, greace = True, True


# --- the multi-task hook ---------------------------------------------------------------------

class ClassHeadLogits(nn.Module):
    """The multi-task network's class logits alone (encoder + class head: no dense decoders)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.head("class")(self.model.encode(x))


class MultiTaskClassDefence(nn.Module):
    """``hmd train --defence NAME``: after the weighting method filled the grads, :meth:`step`
    ADDS the defence's extra contribution for the class head (the reversed aux signal through
    the masked input gradient, the GREACE surrogate, FGSM examples), on the labelled samples
    only, and steps the defence's own optimizer. The defence's forward does not move BN
    running statistics (the weighting method's forward already did, on the same batch)."""

    def __init__(self, defence: Defence):
        super().__init__()
        self.defence = defence

    def set_epoch(self, epoch: int, epochs: int) -> None:
        self.defence.set_epoch(epoch, epochs)

    def step(self, model: nn.Module, x: torch.Tensor, targets: dict[str, torch.Tensor]) -> dict[str, float]:
        labels = targets["class"]
        labelled = labels >= 0
        if not bool(labelled.any()):
            return {}
        logits_fn = ClassHeadLogits(model)
        with FrozenBatchNormStats(model):
            logs = self.defence.train_step(logits_fn, x[labelled], labels[labelled], include_ce=False)
        return {f"defence_{k}": v for k, v in logs.items()}


def create_class_defence(name: str, model: nn.Module, **options: Any) -> MultiTaskClassDefence:
    """The defence ``name`` for the class head of a :class:`models.network.MultiTaskNet`."""
    return MultiTaskClassDefence(create_defence(name, model.cfg, **options))
