"""GREACE (gradient-adversarial cross-entropy): the readings of the paper's eq. 6.

The paper (eq. 6, Algorithm 1 line 8) modifies the cross-entropy's gradient w.r.t. the main
logits a as

    grad_a C_hat = grad_a C + beta * softmax(a') * 1[k != y]          (a' = the aux logits)

and its text says what that is for: GREACE "adapts the cross-entropy loss function to add
weight to the negative classes whose gradient tensors are similar to those of the primary
class"; the patent: it "up-weights the backward gradient magnitude, and hence the loss
assigned to classes whose gradients are easily confused [...] similar in spirit to focal loss".
Every reading below adds ``beta * delta`` to the per-sample logit gradient of the cross-entropy
(p = softmax(a), p' = softmax(a'), q_k = p'_k on the negative classes k != y, 0 on y):

* ``literal``    delta = q: the formula as printed. A constant push on every negative logit
  that never saturates: the cross-entropy's own pull (1 - p_y) vanishes as a sample is learnt,
  the push does not (it only shrinks as the aux classifier gets confident).
* ``reweight``   delta = q * p: the cross-entropy's own negative-class gradient p_k re-weighted
  to (1 + beta p'_k) p_k -- "adds weight to the negative classes", focal-loss-like; it vanishes
  with the cross-entropy's gradient.
* ``scaled``     delta = q * (1 - p_y): the literal term scaled by the size of the
  cross-entropy's negative-class gradient (sum_{k != y} p_k = 1 - p_y).
* ``normalised`` the modified gradient grad_a C + beta q rescaled to the cross-entropy
  gradient's L2 norm: the direction tilts towards the confused classes, the step size is the
  cross-entropy's.

All are applied the same way: the surrogate ``beta * mean_i sum_k sg(delta_ik) a_ik`` is added
to the loss, so its logit gradient is exactly beta * delta / B (B: the batch, the cross-entropy
being a batch mean) and nothing flows into the aux network or through delta.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

GREACE_VARIANTS = ("reweight", "literal", "scaled", "normalised")
DEFAULT_GREACE = "reweight"


def _negative_aux_probs(logits: torch.Tensor, aux_logits: torch.Tensor, labels: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(p, q, onehot): main softmax, aux softmax on the negative classes, one-hot of y (all detached)."""
    onehot = F.one_hot(labels, logits.shape[1]).to(logits.dtype)
    p = torch.softmax(logits.detach(), 1)
    q = torch.softmax(aux_logits.detach(), 1).to(logits.dtype) * (1.0 - onehot)
    return p, q, onehot


def greace_delta(variant: str, logits: torch.Tensor, aux_logits: torch.Tensor, labels: torch.Tensor,
                 beta: float) -> torch.Tensor:
    """Per sample, what GREACE ``variant`` adds to d CE_i / d a_i (B x K, detached, beta included)."""
    p, q, onehot = _negative_aux_probs(logits, aux_logits, labels)
    if variant == "literal":
        return beta * q
    if variant == "reweight":
        return beta * q * p
    if variant == "scaled":
        return beta * q * (1.0 - (p * onehot).sum(1, keepdim=True))
    if variant == "normalised":
        ce_grad = p - onehot
        modified = ce_grad + beta * q
        scale = ce_grad.norm(dim=1, keepdim=True) / modified.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return modified * scale - ce_grad
    raise ValueError(f"unknown GREACE variant {variant!r} (choose from {', '.join(GREACE_VARIANTS)})")


def greace_loss(variant: str, logits: torch.Tensor, aux_logits: torch.Tensor, labels: torch.Tensor,
                beta: float) -> torch.Tensor:
    """The surrogate added to the batch-mean cross-entropy: its gradient w.r.t. a_i is
    ``greace_delta(...)_i / B``; no gradient reaches ``aux_logits``."""
    delta = greace_delta(variant, logits, aux_logits, labels, beta)
    return (delta * logits).sum(1).mean()


def greace_surrogate(logits: torch.Tensor, aux_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The literal reading at beta 1: mean_i sum_{k != y_i} sg(softmax(a'_i)_k) a_ik."""
    return greace_loss("literal", logits, aux_logits, labels, 1.0)
