"""The explicit input-gradient engine (fast double backprop) of the ``resnet`` and ``cnn5``
classifiers: logits plus a differentiable v^T d logits / dx built from explicit ops (transposed
convolutions, the BN and activation derivatives) -- the GREAT defence's and distillation's
input gradients. Same values and second derivatives as autograd (tests pin both); on CPU
autograd's double backward of a convolution is a slow large-kernel convolution, the explicit
one a weight-gradient kernel.

``grad_bn`` (:data:`DEFAULT_GRAD_BN`, the same default for every function and class that takes
it): ``"batch"`` (default) differentiates train-mode BN's batch statistics exactly (the paper's
maths); ``"detached"`` holds them constant (a per-sample gradient; a faster flag, see
:mod:`models.defence`). In eval mode both are the same.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
import torch.nn.functional as F

from shared.errors import UserError

from models.classifier import CNN5, ResNetClassifier, pool_to
from models.network import ClassHead, Encoder, ResidualBlock

GRAD_BN_CHOICES = ("batch", "detached")
DEFAULT_GRAD_BN = "batch"  # the paper's maths; "detached" is the faster flag
INPUT_GRAD_CHOICES = ("explicit", "autograd")


def _act_backward(act: nn.Module, g: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``g`` times d act / d pre-activation, read from the activation's OUTPUT ``y`` (the
    activations run in place): autograd's own fused threshold / leaky-ReLU backward kernels
    (one op instead of compare, cast and multiply), differentiable in ``g`` for double backprop
    (a positive leaky slope keeps the output's sign, so the mask from ``y`` is the input's)."""
    # ``y`` detached: the mask's derivative is zero, but autograd would materialise that zero as a
    # full-size tensor and add it into y's gradient (measured: ~10 % of a CNN-5 double backprop)
    if isinstance(act, nn.ReLU):
        return torch.ops.aten.threshold_backward(g, y.detach(), 0.0)
    if isinstance(act, nn.LeakyReLU):
        return torch.ops.aten.leaky_relu_backward(g, y.detach(), act.negative_slope, True)
    raise TypeError(f"no explicit derivative for {type(act).__name__}")


def _bn_forward(bn: nn.modules.batchnorm._BatchNorm, x: torch.Tensor
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """``bn(x)`` (running statistics updated exactly as ``_BatchNorm.forward`` does) and, with
    batch statistics, the batch's (mean, 1/sqrt(var + eps)) per channel (no graph)."""
    if type(bn) not in (nn.BatchNorm1d, nn.BatchNorm2d) or not (bn.training or bn.running_var is None):
        return bn(x), None
    bn._check_input_dim(x)
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    y, mean, invstd = torch.native_batch_norm(x, bn.weight, bn.bias, bn.running_mean, bn.running_var, True,
                                              factor, bn.eps)
    return y, (mean.detach(), invstd.detach())


BatchStats = tuple[torch.Tensor, torch.Tensor]  # a BN batch's (mean, 1/sqrt(var + eps)), no graph


def _batch_stats(bn: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> BatchStats:
    with torch.no_grad():
        dims = (0,) + tuple(range(2, x.dim()))
        return x.mean(dims), torch.rsqrt(x.var(dims, unbiased=False) + bn.eps)


def _bn_scale(bn: nn.modules.batchnorm._BatchNorm, x: torch.Tensor, grad_bn: str,
              stats: BatchStats | None = None) -> torch.Tensor | None:
    """The per-channel factor d BN(x) / dx is, where it is one: running statistics (eval mode) or
    batch statistics held constant (``grad_bn == "detached"``); None for the exact batch-statistics
    derivative (``"batch"`` in train mode), which mixes samples."""
    if not bn.training and bn.running_var is not None:
        inv = torch.rsqrt(bn.running_var + bn.eps)
    elif grad_bn == "detached":
        inv = (stats if stats is not None else _batch_stats(bn, x))[1]
    else:
        return None
    return bn.weight * inv if bn.weight is not None else inv


def _bn_backward(bn: nn.modules.batchnorm._BatchNorm, x: torch.Tensor, gy: torch.Tensor,
                 grad_bn: str, stats: BatchStats | None = None) -> torch.Tensor:
    """d BN(x) / dx applied to gy. With batch statistics (train mode) and ``grad_bn == "batch"``
    this is the exact autograd maths (the statistics' cross-sample terms included): autograd's own
    kernel, ``native_batch_norm_backward``, whose derivative (``batchnorm_double_backward``)
    differentiates the batch statistics as functions of ``x`` -- what ``autograd.grad(...,
    create_graph=True)`` through ``bn`` computes, in one fused op instead of a dozen full-size ones
    (measured: ~40 % of a CNN-5 double backprop). ``grad_bn == "detached"`` treats the batch
    statistics as constants (per-sample gradient)."""
    shape = (1, -1) + (1,) * (x.dim() - 2)
    scale = _bn_scale(bn, x, grad_bn, stats)
    if scale is not None:
        return gy * scale.view(shape)
    mean, invstd = stats if stats is not None else _batch_stats(bn, x)
    return torch.ops.aten.native_batch_norm_backward(gy, x, bn.weight, bn.running_mean, bn.running_var, mean,
                                                     invstd, True, bn.eps, [True, False, False])[0]


def _conv_bn_backward(conv: nn.Conv2d, bn: nn.modules.batchnorm._BatchNorm, c: torch.Tensor, x_shape: torch.Size,
                      gy: torch.Tensor, grad_bn: str, stats: BatchStats | None) -> torch.Tensor:
    """d bn(conv(x)) / dx applied to gy (``c`` = conv(x)). Where BN's derivative is a per-channel
    factor it is folded into the (small) weight of the transposed convolution instead of
    multiplying the (large) gradient map: the same maths, one full-size op fewer each way."""
    scale = _bn_scale(bn, c, grad_bn, stats)
    if scale is None:
        return _conv_backward(conv, x_shape, _bn_backward(bn, c, gy, grad_bn, stats))
    return _conv_backward(conv, x_shape, gy, conv.weight * scale.view(-1, 1, 1, 1))


def _conv_backward(conv: nn.Conv2d, x_shape: torch.Size, gy: torch.Tensor,
                   weight: torch.Tensor | None = None) -> torch.Tensor:
    """d conv(x) / dx applied to gy, as a transposed convolution: its own backward (the weight
    gradient of double backprop) runs as a fast weight-gradient kernel, unlike autograd's
    double backward of ``convolution_backward`` (a large-kernel convolution on CPU)."""
    k, s, p, d = conv.kernel_size, conv.stride, conv.padding, conv.dilation
    if conv.groups != 1 or isinstance(p, str):
        raise TypeError("explicit conv backward: groups / string padding unsupported")
    out_pad = tuple(x_shape[2 + i] - ((gy.shape[2 + i] - 1) * s[i] - 2 * p[i] + d[i] * (k[i] - 1) + 1)
                    for i in range(2))
    return F.conv_transpose2d(gy, conv.weight if weight is None else weight, None, s, p, out_pad, 1, d)


class _Trace:
    """The forward's saved tensors and a reverse list of backward steps."""

    def __init__(self, grad_bn: str):
        self.grad_bn = grad_bn
        self.steps: list[Callable[[torch.Tensor], torch.Tensor]] = []

    def conv_bn_act(self, conv: nn.Conv2d, bn: nn.Module, act: nn.Module | None, x: torch.Tensor) -> torch.Tensor:
        c = conv(x)
        y, stats = _bn_forward(bn, c)
        if act is not None:
            y = act(y)
        return y, (lambda g, c=c, y=y, xs=x.shape: _conv_bn_backward(
            conv, bn, c, xs, _act_backward(act, g, y) if act is not None else g, self.grad_bn, stats))


def _forward_resnet(model: "ResNetClassifier", x: torch.Tensor, tr: _Trace):
    enc = model.encoder
    h, stem_bwd = tr.conv_bn_act(enc.stem[0], enc.stem[1], enc.stem[2], (x - enc.mean) / enc.std)
    blocks = []
    for block in (b for stage in enc.stages for b in stage):
        h1, bwd1 = tr.conv_bn_act(block.conv1, block.bn1, block.act, h)
        c2 = block.conv2(h1)
        b2, st2 = _bn_forward(block.bn2, c2)
        if isinstance(block.skip, nn.Identity):
            s, skip_bwd = h, None
        else:
            s, skip_bwd = tr.conv_bn_act(block.skip[0], block.skip[1], None, h)
        out = block.act(b2 + s)
        blocks.append((block, bwd1, c2, st2, h1.shape, skip_bwd, out))
        h = out
    logits = model.head(h)
    hw = h.shape[2] * h.shape[3]

    def vjp(v: torch.Tensor) -> torch.Tensor:
        g = (v @ model.head.fc.weight).div(hw)[:, :, None, None].expand(h.shape)
        for block, bwd1, c2, st2, h1_shape, skip_bwd, out in reversed(blocks):
            g = _act_backward(block.act, g, out)
            gi = bwd1(_conv_bn_backward(block.conv2, block.bn2, c2, h1_shape, g, tr.grad_bn, st2))
            g = gi + (g if skip_bwd is None else skip_bwd(g))
        return stem_bwd(g) / enc.std
    return logits, vjp


def _forward_cnn5(model: "CNN5", x: torch.Tensor, tr: _Trace):
    f = model.features
    h = (x - model.mean) / model.std
    bwds = []
    for i in range(0, len(f), 3):
        h, b = tr.conv_bn_act(f[i], f[i + 1], f[i + 2], h)
        bwds.append(b)
    feat = h.detach().requires_grad_(True)
    pooled = pool_to(h, 8)
    lin, bn1, act1 = model.fc1
    z = lin(pooled.flatten(1))
    a, st1 = _bn_forward(bn1, z)
    a = act1(a)
    logits = model.fc2(a)

    def vjp(v: torch.Tensor) -> torch.Tensor:
        g = _act_backward(act1, v @ model.fc2.weight, a)
        g = (_bn_backward(bn1, z, g, tr.grad_bn, st1) @ lin.weight).view(pooled.shape)
        if pooled.shape != h.shape:
            with torch.enable_grad():  # the pooling's backward is linear in g (and independent of h)
                (g,) = torch.autograd.grad(pool_to(feat, 8), feat, g, create_graph=torch.is_grad_enabled()
                                           and g.requires_grad)
        for b in reversed(bwds):
            g = b(g)
        return g / model.std
    return logits, vjp


def forward_with_input_vjp(model: nn.Module, x: torch.Tensor, grad_bn: str = DEFAULT_GRAD_BN):
    """``(logits, vjp)`` with ``vjp(v)`` = v^T d logits / dx built from explicit, differentiable ops
    (graph recorded when grad mode is on), or ``None`` for an unsupported model (use autograd).

    Same values as ``torch.autograd.grad(logits, x, v, create_graph=True)`` for ``grad_bn="batch"``
    (tests pin it), cheaper to differentiate again on CPU; ``x`` need not require grad."""
    if grad_bn not in GRAD_BN_CHOICES:
        raise UserError(f"grad_bn must be 'batch' or 'detached', got {grad_bn!r}")
    if not _explicit_supported(model):
        return None
    tr = _Trace(grad_bn)
    if type(model) is ResNetClassifier:
        return _forward_resnet(model, x, tr)
    return _forward_cnn5(model, x, tr)


def logits_and_input_vjp(logits_fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, labels: torch.Tensor,
                         logit_grad: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], create_graph: bool,
                         input_grad: str = "explicit", grad_bn: str = DEFAULT_GRAD_BN) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, g) from one forward, g_i = (d logits_i / d x_i)^T logit_grad(logits, labels)_i: the
    per-sample input gradient of a loss given its gradient at the logits (the defence's masked
    cross-entropy, the distillation's plain one). ``input_grad="explicit"``: built from explicit
    ops (:func:`forward_with_input_vjp`: same maths, cheaper double backprop on CPU; without
    ``create_graph`` no graph is recorded) where the network supports it, else autograd (which
    always differentiates the BN statistics: ``grad_bn`` applies to the explicit path). The
    forward graph of the logits is kept either way."""
    fw = forward_with_input_vjp(logits_fn, x.detach(), grad_bn) if input_grad == "explicit" else None
    if fw is None:
        with torch.enable_grad():
            xr = x.detach().requires_grad_(True)
            logits = logits_fn(xr)
            (g,) = torch.autograd.grad(logits, xr, grad_outputs=logit_grad(logits, labels),
                                       create_graph=create_graph, retain_graph=True)
        return logits, (g if create_graph else g.detach())
    logits, vjp = fw
    if create_graph:
        return logits, vjp(logit_grad(logits, labels))
    with torch.no_grad():
        return logits, vjp(logit_grad(logits.detach(), labels))


_EXPLICIT_MODULES = (ResNetClassifier, CNN5, Encoder, ClassHead, ResidualBlock, nn.Sequential, nn.Identity, nn.Linear,
                     nn.BatchNorm1d, nn.BatchNorm2d, nn.ReLU, nn.LeakyReLU, nn.AdaptiveAvgPool2d)


def _explicit_supported(model: nn.Module) -> bool:
    if type(model) not in (ResNetClassifier, CNN5):
        return False
    for m in model.modules():
        if type(m) is nn.Conv2d:
            if m.groups != 1 or isinstance(m.padding, str) or m.padding_mode != "zeros":
                return False
        elif type(m) not in _EXPLICIT_MODULES:
            return False
    return True
