"""Single-task classifiers for the adversarial defence and distillation experiments.

Two architectures, registered by name:

``resnet``  our encoder family (:class:`models.network.Encoder`) plus the ResNet
            classifier tail (:class:`models.network.ClassHead`); RGB input in [0, 1],
            normalisation inside the model. The defence's main network, the
            distillation teacher, and -- with leaky-ReLU 0.2 -- the defence's
            auxiliary classifier (the paper: "a copy of the main network").
``cnn5``    the paper's CNN-5 student (supplement, CNN-5+ResNet-18): three 3x3
            convs (32, 64, 128 channels, the 2nd and 3rd with stride 2), then two
            linear layers (128, classes); BN + ReLU after every layer but the last.
            With leaky-ReLU 0.2 it is the distillation's binary discriminator.

Also here: :func:`forward_with_input_vjp` (logits plus an explicit, differentiable input
gradient of both architectures: the GREAT defence's and distillation's fast double backprop),
the labelled image tensors these experiments train on, the paper's
augmentation (flips, crops from a 4-padded image), accuracy, and the classifier
checkpoint format shared by ``hmd defend``, ``hmd distill`` and ``hmd attack``.
"""
from __future__ import annotations

import dataclasses
import io
import math
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

from shared.atomic import atomic_write_bytes
from shared.errors import UserError

from models.data import load_source
from models.network import ClassHead, Encoder, NetConfig, ResidualBlock, make_activation
from models.train import SmoothedValue
from models.weighting import normalise_per_sample, poly_multiplier  # noqa: F401 (re-exported)

CLASSIFIER_FORMAT = "great-hmd-classifier/1"
CHECKPOINT_NAME = "checkpoint.pt"

_ARCHS: dict[str, Callable[[NetConfig], nn.Module]] = {}


def register_arch(name: str):
    def deco(fn):
        if name in _ARCHS:
            raise ValueError(f"architecture {name!r} registered twice")
        _ARCHS[name] = fn
        return fn
    return deco


def list_archs() -> list[str]:
    return list(_ARCHS)


def create_classifier(arch: str, cfg: NetConfig) -> nn.Module:
    if arch not in _ARCHS:
        raise KeyError(f"unknown classifier architecture {arch!r} (choose from {', '.join(_ARCHS)})")
    model = _ARCHS[arch](cfg)
    model.arch = arch  # type: ignore[attr-defined]
    model.cfg = cfg  # type: ignore[attr-defined]
    return model


class Classifier(nn.Module):
    """Encoder + global-pool linear head: logits for an image batch (B x C x H x W in [0, 1])."""

    def __init__(self, cfg: NetConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.head = ClassHead(cfg.feature_channels, cfg.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


class CNN5(nn.Module):
    """The paper's CNN-5 (3 convs of 32/64/128 channels, strides 1/2/2; linear 128; linear classes).

    ``cfg.width`` is the first conv's channels (paper: 32). The convolutional output is
    average-pooled to 8 x 8 before flattening -- exactly the paper's 8 x 8 x 128 at 32 x 32
    input -- so any input size works.
    """

    def __init__(self, cfg: NetConfig):
        super().__init__()
        self.cfg = cfg
        w, act = cfg.width, cfg.activation
        self.register_buffer("mean", torch.tensor(cfg.mean), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.std), persistent=False)
        layers: list[nn.Module] = []
        cin = cfg.in_channels
        for i, stride in enumerate((1, 2, 2)):
            cout = w << i
            layers += [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), make_activation(act)]
            cin = cout
        self.features = nn.Sequential(*layers)
        self.fc1 = nn.Sequential(nn.Linear(cin * 64, 128, bias=False), nn.BatchNorm1d(128), make_activation(act))
        self.fc2 = nn.Linear(128, cfg.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = pool_to(self.features((x - self.mean) / self.std), 8)
        return self.fc2(self.fc1(f.flatten(1)))


def pool_to(h: torch.Tensor, side: int) -> torch.Tensor:
    """``nn.AdaptiveAvgPool2d(side)(h)``, the same values, without its slow general kernel where it
    is not needed: the identity when ``h`` is already side x side (CNN-5 at 32x32 input), a plain
    average pool when the sides divide (measured: the adaptive kernel cost ~13 % of a CNN-5 step)."""
    hh, ww = h.shape[-2:]
    if (hh, ww) == (side, side):
        return h
    if hh % side == 0 and ww % side == 0:
        return F.avg_pool2d(h, (hh // side, ww // side))
    return F.adaptive_avg_pool2d(h, side)


@register_arch("resnet")
def _resnet(cfg: NetConfig) -> nn.Module:
    return Classifier(cfg)


@register_arch("cnn5")
def _cnn5(cfg: NetConfig) -> nn.Module:
    return CNN5(cfg)


def aux_copy_config(cfg: NetConfig, num_classes: int | None = None) -> NetConfig:
    """The auxiliary network's config: same family, leaky-ReLU 0.2, no pixel normalisation
    (its input is a gradient, normalised per sample by the caller)."""
    return dataclasses.replace(cfg, activation="leaky", mean=0.0, std=1.0,
                               num_classes=cfg.num_classes if num_classes is None else num_classes)


def set_bn_momentum(model: nn.Module, momentum: float | None) -> dict[nn.Module, float | None]:
    """Set every BN layer's momentum; returns the old values (momentum 0 freezes running stats)."""
    old = {}
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            old[m] = m.momentum
            m.momentum = momentum
    return old


class FrozenBatchNormStats:
    """Context: train-mode forwards that do not move BN running statistics (extra forwards
    such as adversarial-example generation must not pollute them)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.old: dict[nn.Module, float | None] = {}

    def __enter__(self):
        self.old = set_bn_momentum(self.model, 0.0)
        return self

    def __exit__(self, *exc):
        for m, v in self.old.items():
            m.momentum = v


# --- data ------------------------------------------------------------------------------------

@dataclasses.dataclass
class LabelledImages:
    """Labelled RGB images as tensors: ``x`` float B x 3 x H x W in [0, 1], ``y`` int64."""

    x: torch.Tensor
    y: torch.Tensor
    class_names: list[str]
    source: str

    def __len__(self) -> int:
        return len(self.y)

    @property
    def size(self) -> int:
        return int(self.x.shape[-1])

    def subset(self, idx: torch.Tensor | np.ndarray) -> "LabelledImages":
        idx = torch.as_tensor(idx, dtype=torch.long)
        return LabelledImages(self.x[idx], self.y[idx], self.class_names, self.source)

    def fraction(self, frac: float, seed: int = 0) -> "LabelledImages":
        """A class-stratified random ``frac`` of the set (at least one image per present class)."""
        if not 0.0 < frac <= 1.0:
            raise UserError(f"fraction must be in (0, 1], got {frac}")
        if frac == 1.0:
            return self
        g = np.random.default_rng(seed)
        y = self.y.numpy()
        keep = []
        for c in np.unique(y):
            idx = np.nonzero(y == c)[0]
            k = max(1, int(round(frac * len(idx))))
            keep.append(g.choice(idx, k, replace=False))
        return self.subset(np.sort(np.concatenate(keep)))


def load_labelled(source: str, split: str, size: int | None, seed: int = 0,
                  limit: int | None = None) -> LabelledImages:
    """``load_source`` restricted to labelled frames, as [0, 1] tensors."""
    frames = load_source(source, split, size, seed)
    keep = np.nonzero(frames.labels >= 0)[0]
    if len(keep) == 0:
        raise UserError(f"data source {source!r} ({split}) has no labelled frames: classifiers need labels")
    if limit is not None:
        keep = keep[:limit]
    x = torch.from_numpy(np.ascontiguousarray(frames.rgb[keep].transpose(0, 3, 1, 2))).float() / 255.0
    return LabelledImages(x, torch.from_numpy(frames.labels[keep].astype(np.int64)), list(frames.class_names),
                          frames.source)


def augment(x: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random horizontal flips and random crops from a ``pad``-padded image (the paper's)."""
    b, _, h, w = x.shape
    flip = torch.rand(b, generator=generator) < 0.5
    x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
    if pad <= 0:
        return x
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    # gather the crops with one indexing op (no Python loop per sample)
    rows = (dy.view(b, 1) + torch.arange(h).view(1, h)).view(b, 1, h, 1).expand(b, x.shape[1], h, w + 2 * pad)
    padded = padded.gather(2, rows)
    cols = (dx.view(b, 1) + torch.arange(w).view(1, w)).view(b, 1, 1, w).expand(b, x.shape[1], h, w)
    return padded.gather(3, cols).contiguous()


@torch.no_grad()
def accuracy(model: nn.Module, data: LabelledImages, batch_size: int = 256) -> float:
    """Top-1 accuracy in % (eval mode; the model's mode is restored afterwards)."""
    was = model.training
    model.eval()
    correct = 0
    for s in range(0, len(data), batch_size):
        correct += int((model(data.x[s:s + batch_size]).argmax(1) == data.y[s:s + batch_size]).sum())
    model.train(was)
    return 100.0 * correct / max(1, len(data))


# --- checkpoints ------------------------------------------------------------------------------

def save_classifier(out_dir: str | Path, model: nn.Module, **extra: Any) -> Path:
    """Write ``out_dir/checkpoint.pt`` in the classifier format (arch, config, weights, extra)."""
    path = Path(out_dir) / CHECKPOINT_NAME
    state = {"format": CLASSIFIER_FORMAT, "task": "classify", "arch": model.arch,  # type: ignore[attr-defined]
             "net": model.cfg.to_dict(), "model": model.state_dict(), **extra}  # type: ignore[attr-defined]
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())
    return path


def read_classifier_checkpoint(run_dir: str | Path, what: str = "model") -> dict[str, Any]:
    p = Path(run_dir)
    path = p / CHECKPOINT_NAME if p.is_dir() else p
    if not path.is_file():
        raise UserError(f"{what}: no checkpoint at {path} (expected a folder written by `hmd defend` or "
                        f"`hmd distill`)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any failure means "not a checkpoint"
        raise UserError(f"{what}: {path} is not a readable checkpoint ({type(exc).__name__})") from None
    if not isinstance(ckpt, dict):
        raise UserError(f"{what}: {path} is not a great-hmd checkpoint")
    if ckpt.get("format") == "great-hmd-checkpoint/1":
        raise UserError(f"{what}: {path} is a multi-task checkpoint (`hmd train`), not a classifier "
                        f"(`hmd defend` / `hmd distill`)")
    if ckpt.get("format") != CLASSIFIER_FORMAT or ckpt.get("task") != "classify":
        raise UserError(f"{what}: {path} is not a great-hmd classifier checkpoint")
    if ckpt.get("arch") not in _ARCHS:
        raise UserError(f"{what}: {path} has architecture {ckpt.get('arch')!r}, not one of {', '.join(_ARCHS)}")
    return ckpt


def classifier_from_checkpoint(ckpt: dict[str, Any], what: str = "model") -> nn.Module:
    try:
        model = create_classifier(ckpt["arch"], NetConfig.from_dict(ckpt["net"]))
        model.load_state_dict(ckpt["model"])
    except (KeyError, ValueError, RuntimeError, TypeError) as exc:
        raise UserError(f"{what}: checkpoint does not match its {ckpt.get('arch')!r} architecture: "
                        f"{str(exc).splitlines()[0]}") from None
    return model.eval()


def load_classifier(run_dir: str | Path, what: str = "model") -> tuple[nn.Module, dict[str, Any]]:
    ckpt = read_classifier_checkpoint(run_dir, what)
    return classifier_from_checkpoint(ckpt, what), ckpt


# --- the shared training loop -------------------------------------------------------------------

def fit(model: nn.Module, step: Callable[[torch.Tensor, torch.Tensor], dict[str, float]],
        train_data: LabelledImages, val_data: LabelledImages, *, epochs: int, batch_size: int,
        optimizers: list[torch.optim.Optimizer], seed: int, tag: str,
        on_epoch: Callable[[int, int], None] | None = None, augment_data: bool = True,
        max_steps: int | None = None, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Epoch loop: poly lr multiplier on every optimizer, shuffled (augmented) batches,
    ``step(x, y)`` does forward/backward/optimizer steps and returns logs; held-out accuracy
    after every epoch. Returns the per-epoch history."""
    gen = torch.Generator().manual_seed(seed + 1)
    n = len(train_data)
    bs = min(batch_size, n)
    steps = max(1, n // bs)
    if max_steps:
        steps = min(steps, max_steps)
    history = []
    for epoch in range(epochs):
        m = poly_multiplier(epoch, epochs)
        for opt in optimizers:
            for g in opt.param_groups:
                g["lr"] = g.setdefault("initial_lr", g["lr"]) * m
        if on_epoch is not None:
            on_epoch(epoch, epochs)
        model.train()
        perm = torch.randperm(n, generator=gen)
        meters: dict[str, SmoothedValue] = {}
        step_time = SmoothedValue()
        t0 = time.perf_counter()
        report_every = max(1, steps // 4)
        for s in range(steps):
            ts = time.perf_counter()
            idx = perm[s * bs:(s + 1) * bs]
            x = train_data.x[idx]
            if augment_data:
                x = augment(x, gen)
            logs = step(x, train_data.y[idx])
            for k, v in logs.items():
                meters.setdefault(k, SmoothedValue()).update(v)
            if not all(math.isfinite(v) for v in logs.values()):
                raise RuntimeError(f"training diverged at epoch {epoch + 1} step {s + 1}: {logs}")
            step_time.update(time.perf_counter() - ts)
            if (s + 1) % report_every == 0 or s + 1 == steps:
                eta = step_time.avg * ((steps - s - 1) + steps * (epochs - epoch - 1))
                shown = " ".join(f"{k}={meters[k].avg:.4f}" for k in sorted(meters))
                log(f"[{tag}] epoch {epoch + 1}/{epochs} step {s + 1}/{steps} {shown} "
                    f"{step_time.avg * 1000:.0f}ms/step eta {eta:.0f}s")
        val_acc = accuracy(model, val_data)
        history.append({"epoch": epoch + 1, "lr_multiplier": m, "seconds": time.perf_counter() - t0,
                        "train": {k: v.global_avg for k, v in meters.items()}, "val_accuracy": val_acc})
        log(f"[{tag}] epoch {epoch + 1}/{epochs} held-out accuracy {val_acc:.2f}%")
    return history


# --- explicit input gradients (fast double backprop) ------------------------------------------

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
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``bn(x)`` (running statistics updated exactly as ``_BatchNorm.forward`` does) and, with
    batch statistics, the batch's 1/sqrt(var + eps) per channel (no graph)."""
    if type(bn) not in (nn.BatchNorm1d, nn.BatchNorm2d) or not (bn.training or bn.running_var is None):
        return bn(x), None
    bn._check_input_dim(x)
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    y, _, invstd = torch.native_batch_norm(x, bn.weight, bn.bias, bn.running_mean, bn.running_var, True,
                                           factor, bn.eps)
    return y, invstd.detach()


def _bn_scale(bn: nn.modules.batchnorm._BatchNorm, x: torch.Tensor, bn_grad: str,
              invstd: torch.Tensor | None = None) -> torch.Tensor | None:
    """The per-channel factor d BN(x) / dx is, where it is one: running statistics (eval mode) or
    batch statistics held constant (``bn_grad == "detached"``); None for the exact batch-statistics
    derivative (``"batch"`` in train mode), which mixes samples."""
    if not bn.training and bn.running_var is not None:
        inv = torch.rsqrt(bn.running_var + bn.eps)
    elif bn_grad == "detached":
        if invstd is None:
            with torch.no_grad():
                invstd = torch.rsqrt(x.var((0,) + tuple(range(2, x.dim())), unbiased=False) + bn.eps)
        inv = invstd.detach()
    else:
        return None
    return bn.weight * inv if bn.weight is not None else inv


def _bn_backward(bn: nn.modules.batchnorm._BatchNorm, x: torch.Tensor, gy: torch.Tensor,
                 bn_grad: str, invstd: torch.Tensor | None = None) -> torch.Tensor:
    """d BN(x) / dx applied to gy. With batch statistics (train mode) and ``bn_grad == "batch"``
    this is the exact autograd maths (the statistics' cross-sample terms included);
    ``bn_grad == "detached"`` treats the batch statistics as constants (per-sample gradient)."""
    shape = (1, -1) + (1,) * (x.dim() - 2)
    scale = _bn_scale(bn, x, bn_grad, invstd)
    if scale is not None:
        return gy * scale.view(shape)
    dims = (0,) + tuple(range(2, x.dim()))
    gamma = bn.weight.view(shape) if bn.weight is not None else 1.0
    mu = x.mean(dims, keepdim=True)
    inv = torch.rsqrt(x.var(dims, unbiased=False, keepdim=True) + bn.eps)
    xhat = (x - mu) * inv
    return (gamma * inv) * (gy - gy.mean(dims, keepdim=True) - xhat * (gy * xhat).mean(dims, keepdim=True))


def _conv_bn_backward(conv: nn.Conv2d, bn: nn.modules.batchnorm._BatchNorm, c: torch.Tensor, x_shape: torch.Size,
                      gy: torch.Tensor, bn_grad: str, invstd: torch.Tensor | None) -> torch.Tensor:
    """d bn(conv(x)) / dx applied to gy (``c`` = conv(x)). Where BN's derivative is a per-channel
    factor it is folded into the (small) weight of the transposed convolution instead of
    multiplying the (large) gradient map: the same maths, one full-size op fewer each way."""
    scale = _bn_scale(bn, c, bn_grad, invstd)
    if scale is None:
        return _conv_backward(conv, x_shape, _bn_backward(bn, c, gy, bn_grad, invstd))
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

    def __init__(self, bn_grad: str):
        self.bn_grad = bn_grad
        self.steps: list[Callable[[torch.Tensor], torch.Tensor]] = []

    def conv_bn_act(self, conv: nn.Conv2d, bn: nn.Module, act: nn.Module | None, x: torch.Tensor) -> torch.Tensor:
        c = conv(x)
        y, invstd = _bn_forward(bn, c)
        if act is not None:
            y = act(y)
        return y, (lambda g, c=c, y=y, xs=x.shape: _conv_bn_backward(
            conv, bn, c, xs, _act_backward(act, g, y) if act is not None else g, self.bn_grad, invstd))


def _forward_resnet(model: "Classifier", x: torch.Tensor, tr: _Trace):
    enc = model.encoder
    h, stem_bwd = tr.conv_bn_act(enc.stem[0], enc.stem[1], enc.stem[2], (x - enc.mean) / enc.std)
    blocks = []
    for block in (b for stage in enc.stages for b in stage):
        h1, bwd1 = tr.conv_bn_act(block.conv1, block.bn1, block.act, h)
        c2 = block.conv2(h1)
        b2, inv2 = _bn_forward(block.bn2, c2)
        if isinstance(block.skip, nn.Identity):
            s, skip_bwd = h, None
        else:
            s, skip_bwd = tr.conv_bn_act(block.skip[0], block.skip[1], None, h)
        out = block.act(b2 + s)
        blocks.append((block, bwd1, c2, inv2, h1.shape, skip_bwd, out))
        h = out
    logits = model.head(h)
    hw = h.shape[2] * h.shape[3]

    def vjp(v: torch.Tensor) -> torch.Tensor:
        g = (v @ model.head.fc.weight).div(hw)[:, :, None, None].expand(h.shape)
        for block, bwd1, c2, inv2, h1_shape, skip_bwd, out in reversed(blocks):
            g = _act_backward(block.act, g, out)
            gi = bwd1(_conv_bn_backward(block.conv2, block.bn2, c2, h1_shape, g, tr.bn_grad, inv2))
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
    a, inv1 = _bn_forward(bn1, z)
    a = act1(a)
    logits = model.fc2(a)

    def vjp(v: torch.Tensor) -> torch.Tensor:
        g = _act_backward(act1, v @ model.fc2.weight, a)
        g = (_bn_backward(bn1, z, g, tr.bn_grad, inv1) @ lin.weight).view(pooled.shape)
        if pooled.shape != h.shape:
            with torch.enable_grad():  # the pooling's backward is linear in g (and independent of h)
                (g,) = torch.autograd.grad(pool_to(feat, 8), feat, g, create_graph=torch.is_grad_enabled()
                                           and g.requires_grad)
        for b in reversed(bwds):
            g = b(g)
        return g / model.std
    return logits, vjp


def forward_with_input_vjp(model: nn.Module, x: torch.Tensor, bn_grad: str = "batch"):
    """``(logits, vjp)`` with ``vjp(v)`` = v^T d logits / dx built from explicit, differentiable ops
    (graph recorded when grad mode is on), or ``None`` for an unsupported model (use autograd).

    Same values as ``torch.autograd.grad(logits, x, v, create_graph=True)`` for ``bn_grad="batch"``
    (tests pin it), cheaper to differentiate again on CPU; ``x`` need not require grad."""
    if bn_grad not in ("batch", "detached"):
        raise UserError(f"bn_grad must be 'batch' or 'detached', got {bn_grad!r}")
    if not _explicit_supported(model):
        return None
    tr = _Trace(bn_grad)
    if type(model) is Classifier:
        return _forward_resnet(model, x, tr)
    return _forward_cnn5(model, x, tr)


def logits_and_input_vjp(logits_fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, labels: torch.Tensor,
                         logit_grad: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], create_graph: bool,
                         input_grad: str = "explicit", grad_bn: str = "batch") -> tuple[torch.Tensor, torch.Tensor]:
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


_EXPLICIT_MODULES = (Classifier, CNN5, Encoder, ClassHead, ResidualBlock, nn.Sequential, nn.Identity, nn.Linear,
                     nn.BatchNorm1d, nn.BatchNorm2d, nn.ReLU, nn.LeakyReLU, nn.AdaptiveAvgPool2d)


def _explicit_supported(model: nn.Module) -> bool:
    if type(model) not in (Classifier, CNN5):
        return False
    for m in model.modules():
        if type(m) is nn.Conv2d:
            if m.groups != 1 or isinstance(m.padding, str) or m.padding_mode != "zeros":
                return False
        elif type(m) not in _EXPLICIT_MODULES:
            return False
    return True
