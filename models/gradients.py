"""Gradient utilities shared by the GREAT variants: scaling / reversal (identity forward) and
per-sample normalisation of gradients before an auxiliary network sees them."""
from __future__ import annotations

import torch


def scale_gradient(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Identity forward; the backward multiplies the gradient by ``scale`` (-alpha: reversal)."""
    if scale == 1.0:
        return x
    return x.detach() + scale * (x - x.detach())


def reverse_gradient(x: torch.Tensor) -> torch.Tensor:
    """The gradient-reversal layer: identity forward, gradient times -1 backward."""
    return scale_gradient(x, -1.0)


def normalise_per_sample(g: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """g / RMS(g) per sample: input and feature gradients are tiny (~1e-6); an auxiliary
    classifier or discriminator sees them at unit scale."""
    rms = g.flatten(1).pow(2).mean(1).add(eps).sqrt()
    return g / rms.view(-1, *([1] * (g.dim() - 1)))
