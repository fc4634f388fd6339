"""Knowledge distillation methods: ``none``, ``kd``, ``great`` (registered in :mod:`models.registry`).

``none``   the student trained on the labels alone (the paper's "Baseline").
``kd``     soft targets (Hinton et al.): alpha * T^2 * KL(softmax(t/T) || softmax(s/T))
           + (1 - alpha) * CE(s, y); the paper's grid: T = 20, alpha 0.1 dense, 0.99 sparse.
``great``  Algorithm 2: a binary discriminator f learns teacher input gradients -> 1, student
           input gradients -> 0; the student minimises (1 - alpha) CE(s, y) and receives the
           reversed discriminator signal -alpha * d BCE(f(g_s), 0) / dtheta through
           g_s = dJ(S(x), y)/dx (double backprop); alpha = 0.1. g_s enters f through
           :func:`scale_gradient`, so a single backward trains f and sends -alpha times its
           gradient to the student.

Defaults are the paper's (supplement, CNN-5+ResNet-18); the faster variants are flags (README,
"Paper vs this implementation"; measured with ``python -m models.bench_robust --compare-faithful``):

* the discriminator is "of the same architecture as the student network, except the ReLU
  activations are replaced with leaky-ReLU with alpha = 0.2" (:func:`discriminator_config`):
  the student's architecture at the student's width. ``disc_arch`` / ``disc_width`` choose
  another (the former default, a width-8 residual net, ``--disc-arch resnet --disc-width 8``).
* ``disc_bn="separate"`` (default): the teacher's and the student's gradients go through the
  discriminator as two batches, so BatchNorm never mixes them and the student receives only
  Algorithm 2's term through f(g_s). ``"joint"`` (one batch of both, a little cheaper) also sends
  the student a term through the batch statistics that Algorithm 2 does not have.
* ``disc_norm="none"`` (default, the paper's): the gradients as they are; ``"rms"`` normalises
  each to unit RMS first (then the two networks' gradient scales cannot tell them apart).
* ``input_grad="explicit"`` (default, not a deviation) builds g_s and g_t from explicit ops
  (:func:`models.input_gradients.forward_with_input_vjp`: same maths, cheaper double backprop on
  CPU; the teacher's g_t records no graph at all). ``grad_bn="batch"`` (default) is the exact
  maths; ``"detached"`` takes g_s with the student's BN batch statistics held constant (faster;
  see :mod:`models.defence`). The teacher is frozen in eval mode, so its g_t is exact either way.

A method is an ``nn.Module`` (the discriminator and its optimizer state save with it);
:meth:`DistillMethod.train_step` fills the student's ``.grad`` and steps its own optimizer.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn
import torch.nn.functional as F

from shared.errors import UserError

from models.classifier import aux_copy_config
from models.gradients import normalise_per_sample, scale_gradient
from models.input_gradients import DEFAULT_GRAD_BN, GRAD_BN_CHOICES, INPUT_GRAD_CHOICES, logits_and_input_vjp
from models.network import NetConfig
from models.own_optimizers import OwnOptimizers
from models.registry import check_choice, create_classifier
from models.schedules import poly_multiplier

PAPER_KD = {"temperature": 20.0, "alpha_dense": 0.1, "alpha_sparse": 0.99}
PAPER_GREAT_ALPHA = 0.1
DISC_BN_CHOICES = ("separate", "joint")


def distill_options(method: str, fraction: float, temperature: float | None = None, alpha: float | None = None,
                    disc_norm: str = "none", disc_arch: str | None = None, disc_width: int | None = None,
                    grad_bn: str = DEFAULT_GRAD_BN, disc_lr: float | None = None,
                    input_grad: str | None = None, disc_bn: str = "separate") -> dict[str, Any]:
    """The options `hmd distill` trains ``method`` with: the paper's where not given (kd's alpha
    depends on the data fraction: dense 0.1, sparse 0.99); ``disc_lr`` / ``input_grad`` only
    when given (else the method's defaults)."""
    if method == "kd":
        a = alpha if alpha is not None else (PAPER_KD["alpha_dense"] if fraction >= 1.0 else PAPER_KD["alpha_sparse"])
        return {"temperature": temperature if temperature is not None else PAPER_KD["temperature"], "alpha": a}
    if method == "great":
        extra = {k: v for k, v in (("disc_lr", disc_lr), ("input_grad", input_grad)) if v is not None}
        return {"alpha": PAPER_GREAT_ALPHA if alpha is None else alpha, "disc_norm": disc_norm,
                "disc_arch": disc_arch, "disc_width": disc_width, "grad_bn": grad_bn, "disc_bn": disc_bn, **extra}
    return {}


# --- the maths ------------------------------------------------------------------------------

def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
            temperature: float, alpha: float) -> torch.Tensor:
    """alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) (batch mean) + (1 - alpha) * CE(s, y)."""
    t = temperature
    kl = F.kl_div(F.log_softmax(student_logits / t, 1), F.log_softmax(teacher_logits.detach() / t, 1),
                  reduction="batchmean", log_target=True)
    return alpha * t * t * kl + (1.0 - alpha) * F.cross_entropy(student_logits, labels)


def ce_grad_outputs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """softmax(a) - onehot(y): the per-sample cross-entropy's gradient at the logits."""
    return torch.softmax(logits, 1) - F.one_hot(labels, logits.shape[1]).to(logits.dtype)


def logits_and_input_gradient(model: nn.Module, x: torch.Tensor, labels: torch.Tensor, create_graph: bool,
                              input_grad: str = "explicit", grad_bn: str = DEFAULT_GRAD_BN
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, per-sample d CE(logits_i, y_i) / d x_i) from one forward (see
    :func:`models.input_gradients.logits_and_input_vjp` for ``input_grad`` / ``grad_bn``)."""
    return logits_and_input_vjp(model, x, labels, ce_grad_outputs, create_graph, input_grad, grad_bn)


def discriminator_config(student: nn.Module | NetConfig, disc_width: int | None = None) -> NetConfig:
    """The discriminator's config: the student's (its width unless ``disc_width``), leaky-ReLU 0.2,
    one logit, no pixel normalisation (its input is a gradient)."""
    cfg = student.cfg if isinstance(student, nn.Module) else student
    if disc_width is not None and int(disc_width) < 1:
        raise UserError(f"discriminator width must be >= 1, got {disc_width}")
    return dataclasses.replace(aux_copy_config(cfg, num_classes=1), width=int(disc_width or cfg.width))


def discriminator_labels(n_teacher: int, n_student: int) -> torch.Tensor:
    """Teacher gradients are the 'real' class 1, student gradients 0 (Algorithm 2, line 6)."""
    return torch.cat([torch.ones(n_teacher), torch.zeros(n_student)])


# --- methods --------------------------------------------------------------------------------

class DistillMethod(OwnOptimizers):
    name = "base"

    def __init__(self, student_cfg: NetConfig, teacher: nn.Module, **_: Any):
        super().__init__()
        self.teacher = [teacher.eval()]  # a list: not a submodule, so not in this state_dict
        for p in teacher.parameters():
            p.requires_grad_(False)

    @property
    def teacher_model(self) -> nn.Module:
        return self.teacher[0]

    def set_epoch(self, epoch: float, epochs: int) -> None:
        """Per-epoch hook (own lr multiplier)."""

    def loss(self, student: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def train_step(self, student: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        self._zero_own()
        total, logs = self.loss(student, x, y)
        self._backward_and_step(total)
        return logs


class NoDistillation(DistillMethod):
    name = "none"

    def loss(self, student, x, y):
        ce = F.cross_entropy(student(x), y)
        return ce, {"ce": float(ce.detach())}


class SoftTargets(DistillMethod):
    """Options: ``temperature`` (20), ``alpha`` (the KL weight: 0.1 dense, 0.99 sparse)."""

    name = "kd"

    def __init__(self, student_cfg, teacher, temperature: float = PAPER_KD["temperature"],
                 alpha: float = PAPER_KD["alpha_dense"], **_: Any):
        super().__init__(student_cfg, teacher)
        self.temperature, self.alpha = float(temperature), float(alpha)

    def loss(self, student, x, y):
        s = student(x)
        with torch.no_grad():
            t = self.teacher_model(x)
        total = kd_loss(s, t, y, self.temperature, self.alpha)
        return total, {"loss": float(total.detach()), "ce": float(F.cross_entropy(s.detach(), y))}


class GradientAdversarialDistillation(DistillMethod):
    """Algorithm 2. Options: ``alpha`` (0.1), ``disc_lr`` (Adam 1e-3), ``disc_norm`` ("none"/"rms"),
    ``disc_arch`` / ``disc_width`` (default the student's width and CNN-5, the paper's student;
    :func:`models.train_classifier.train_distilled` passes the student's architecture; leaky-ReLU
    0.2 always), ``disc_bn`` ("separate"/"joint"), ``input_grad`` ("explicit"/"autograd"),
    ``grad_bn`` ("batch": the paper's, /"detached")."""

    name = "great"

    def __init__(self, student_cfg, teacher, alpha: float = PAPER_GREAT_ALPHA, disc_lr: float = 1e-3,
                 disc_norm: str = "none", disc_arch: str | None = None, input_grad: str = "explicit",
                 disc_width: int | None = None, grad_bn: str = DEFAULT_GRAD_BN, disc_bn: str = "separate",
                 **_: Any):
        super().__init__(student_cfg, teacher)
        self.grad_bn = check_choice("grad_bn", grad_bn, GRAD_BN_CHOICES)
        self.input_grad = check_choice("input_grad", input_grad, INPUT_GRAD_CHOICES)
        self.disc_norm = check_choice("disc_norm", disc_norm, ("none", "rms"))
        self.disc_bn = check_choice("disc_bn", disc_bn, DISC_BN_CHOICES)
        self.alpha = float(alpha)
        # None: the paper's CNN-5 student's (train_distilled passes the student's architecture)
        self.discriminator = create_classifier(disc_arch or "cnn5", discriminator_config(student_cfg, disc_width))
        self.disc_optimizer = torch.optim.Adam(self.discriminator.parameters(), lr=disc_lr)

    def _own_optimizers(self):
        return [self.disc_optimizer]

    def set_epoch(self, epoch, epochs):
        self.set_lr_multiplier(poly_multiplier(epoch, epochs))  # the discriminator follows the main lr policy

    def _prep(self, g: torch.Tensor) -> torch.Tensor:
        return normalise_per_sample(g) if self.disc_norm == "rms" else g

    def loss(self, student, x, y):
        s, g_s = logits_and_input_gradient(student, x, y, True, self.input_grad, self.grad_bn)
        ce = F.cross_entropy(s, y)
        _, g_t = logits_and_input_gradient(self.teacher_model, x, y, False, self.input_grad)
        student_in = scale_gradient(self._prep(g_s), -self.alpha)
        n = len(g_t)
        if self.disc_bn == "joint":  # one batch: BN statistics mix teacher and student gradients
            d_logits = self.discriminator(torch.cat([self._prep(g_t), student_in])).squeeze(1)
        else:  # the paper's: two batches, each normalised by its own statistics
            d_logits = torch.cat([self.discriminator(self._prep(g_t)), self.discriminator(student_in)]).squeeze(1)
        labels = discriminator_labels(n, len(g_s)).to(d_logits.dtype)
        # C' = J(f(g_t), 1) + J(f(g_s), 0)
        d_loss = (F.binary_cross_entropy_with_logits(d_logits[:n], labels[:n])
                  + F.binary_cross_entropy_with_logits(d_logits[n:], labels[n:]))
        total = (1.0 - self.alpha) * ce + d_loss
        with torch.no_grad():
            d_acc = float(((d_logits > 0).to(labels.dtype) == labels).float().mean())
        return total, {"ce": float(ce.detach()), "disc_loss": float(d_loss.detach()), "disc_acc": d_acc}
