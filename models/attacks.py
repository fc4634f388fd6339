"""Adversarial attacks (L-infinity, pixels in [0, 1]) and the paper's Table 1 evaluation.

FGSM, iFGSM (k steps of size eps / k unless told), targeted FGSM / iFGSM towards a
random or the least-likely ("worst") class, PGD with a random start, and a transfer
attack (examples crafted on another, undefended model). Every public attack runs the
model in eval mode (the mode is restored afterwards), clips to [0, 1] at every step
and, for iterative attacks, projects back into the eps-ball around the clean input.
No attack touches the model's parameter gradients (``torch.autograd.grad`` on x only).
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch
from torch import nn
import torch.nn.functional as F

LogitsFn = Callable[[torch.Tensor], torch.Tensor]

# The paper's Table 1 columns (key, header) then the two extra checks the robustness
# community asks for (an iterative attack with random start, a transfer attack).
TABLE1_COLUMNS: tuple[tuple[str, str], ...] = (
    ("train", "Train"), ("clean", "No-Attack"), ("fgsm", "FGSM"), ("ifgsm", "iFGSM"),
    ("fgsm_worst", "T-FGSM worst"), ("fgsm_random", "T-FGSM random"),
    ("ifgsm_worst", "T-iFGSM worst"), ("ifgsm_random", "T-iFGSM random"),
    ("pgd", "PGD"), ("transfer", "Transfer"),
)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` in eval mode inside the block; restore each submodule's mode after."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, t in modes:
            m.train(t)


def check_eps(eps: float) -> float:
    if not 0.0 <= float(eps) <= 1.0:
        raise ValueError(f"eps must be in [0, 1] (pixels are in [0, 1]), got {eps}")
    return float(eps)


def loss_input_gradient(logits_fn: LogitsFn, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """d sum_i CE(f(x_i), labels_i) / dx -- per-sample input gradients, no parameter grads."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        loss = F.cross_entropy(logits_fn(x), labels, reduction="sum")
        (g,) = torch.autograd.grad(loss, x)
    return g


def fgsm_step(logits_fn: LogitsFn, x: torch.Tensor, labels: torch.Tensor, eps: float,
              target: torch.Tensor | None = None) -> torch.Tensor:
    """One signed-gradient step, in whatever mode the model is in (training uses this with
    frozen BN statistics): up the loss of ``labels``, or down the loss of ``target``; clipped."""
    if target is None:
        x_adv = x + eps * loss_input_gradient(logits_fn, x, labels).sign()
    else:
        x_adv = x - eps * loss_input_gradient(logits_fn, x, target).sign()
    return x_adv.clamp(0.0, 1.0).detach()


def fgsm(model: nn.Module, x: torch.Tensor, labels: torch.Tensor, eps: float,
         target: torch.Tensor | None = None) -> torch.Tensor:
    """FGSM (Goodfellow et al.): x + eps sign(grad J(x, y)), or x - eps sign(grad J(x, target))."""
    eps = check_eps(eps)
    with eval_mode(model):
        return fgsm_step(model, x, labels, eps, target)


def ifgsm(model: nn.Module, x: torch.Tensor, labels: torch.Tensor, eps: float, steps: int = 10,
          step_size: float | None = None, target: torch.Tensor | None = None, random_start: bool = False,
          generator: torch.Generator | None = None) -> torch.Tensor:
    """Iterated FGSM (Kurakin et al.): ``steps`` signed steps of ``step_size`` (default eps / steps),
    each followed by projection into the eps-ball around x and clipping to [0, 1].
    ``random_start`` begins at a uniform point of the ball (that is PGD)."""
    eps = check_eps(eps)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    alpha = eps / steps if step_size is None else float(step_size)
    x = x.detach()
    lo, hi = (x - eps).clamp(min=0.0), (x + eps).clamp(max=1.0)
    with eval_mode(model):
        x_adv = x
        if random_start:
            noise = torch.rand(x.shape, generator=generator, dtype=x.dtype) * 2 - 1
            x_adv = torch.max(torch.min(x + eps * noise, hi), lo)
        for _ in range(steps):
            x_adv = fgsm_step(model, x_adv, labels, alpha, target)
            x_adv = torch.max(torch.min(x_adv, hi), lo)
    return x_adv.detach()


def pgd(model: nn.Module, x: torch.Tensor, labels: torch.Tensor, eps: float, steps: int = 10,
        step_size: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """PGD (Madry et al.): random start in the ball, ``steps`` steps of 2.5 eps / steps by default."""
    size = 2.5 * eps / steps if step_size is None else step_size
    return ifgsm(model, x, labels, eps, steps, size, random_start=True, generator=generator)


@torch.no_grad()
def pick_targets(model: nn.Module, x: torch.Tensor, labels: torch.Tensor, kind: str,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Target classes != the true label: ``random`` (uniform) or ``worst`` (least likely on clean x)."""
    with eval_mode(model):
        logits = model(x)
    c = logits.shape[1]
    if kind == "random":
        return (labels + torch.randint(1, c, labels.shape, generator=generator)) % c
    if kind == "worst":
        return logits.scatter(1, labels.view(-1, 1), float("inf")).argmin(1)
    raise ValueError(f"target kind must be 'random' or 'worst', got {kind!r}")


@torch.no_grad()
def _correct(model: nn.Module, x: torch.Tensor, labels: torch.Tensor) -> int:
    with eval_mode(model):
        return int((model(x).argmax(1) == labels).sum())


def robustness_report(model: nn.Module, x: torch.Tensor, labels: torch.Tensor, eps: float, steps: int = 10,
                      step_size: float | None = None, pgd_step_size: float | None = None,
                      train: tuple[torch.Tensor, torch.Tensor] | None = None,
                      transfer_from: nn.Module | None = None, batch_size: int = 200,
                      seed: int = 0) -> dict[str, Any]:
    """Accuracy (%) of ``model`` on (x, labels) clean and under every attack of Table 1, plus PGD and a
    transfer attack (iFGSM crafted on ``transfer_from``). ``train`` adds the train-accuracy column."""
    eps = check_eps(eps)
    gen = torch.Generator().manual_seed(seed)
    keys = [k for k, _ in TABLE1_COLUMNS if k not in ("train", "transfer")]
    correct = {k: 0 for k in keys}
    correct["transfer"] = 0
    n = len(labels)
    for s in range(0, n, batch_size):
        xb, yb = x[s:s + batch_size], labels[s:s + batch_size]
        correct["clean"] += _correct(model, xb, yb)
        correct["fgsm"] += _correct(model, fgsm(model, xb, yb, eps), yb)
        correct["ifgsm"] += _correct(model, ifgsm(model, xb, yb, eps, steps, step_size), yb)
        for kind in ("worst", "random"):
            t = pick_targets(model, xb, yb, kind, gen)
            correct[f"fgsm_{kind}"] += _correct(model, fgsm(model, xb, yb, eps, target=t), yb)
            correct[f"ifgsm_{kind}"] += _correct(model, ifgsm(model, xb, yb, eps, steps, step_size, target=t), yb)
        correct["pgd"] += _correct(model, pgd(model, xb, yb, eps, steps, pgd_step_size, gen), yb)
        if transfer_from is not None:
            correct["transfer"] += _correct(model, ifgsm(transfer_from, xb, yb, eps, steps, step_size), yb)
    acc = {k: 100.0 * v / max(1, n) for k, v in correct.items()}
    if transfer_from is None:
        acc["transfer"] = None
    if train is not None:
        acc["train"] = 100.0 * sum(_correct(model, train[0][s:s + batch_size], train[1][s:s + batch_size])
                                   for s in range(0, len(train[1]), batch_size)) / max(1, len(train[1]))
    else:
        acc["train"] = None
    accuracies = {k: acc[k] for k, _ in TABLE1_COLUMNS}
    return {
        "accuracy_pct": accuracies, "eps": eps, "samples": n, "ifgsm_steps": steps,
        "ifgsm_step_size": eps / steps if step_size is None else step_size,
        "pgd_step_size": 2.5 * eps / steps if pgd_step_size is None else pgd_step_size,
        "pgd_random_start": True,
        "transfer": "iFGSM crafted on the --transfer-from model" if transfer_from is not None else None,
    }


def format_table(rows: dict[str, dict[str, float | None]], paper: dict[str, list[float]] | None = None) -> str:
    """A text table: one row per model (accuracy %), optionally each followed by the paper's row."""
    heads = [h for _, h in TABLE1_COLUMNS]
    width = max([12] + [len(r) + 2 for r in rows] + [len(f"  paper {r}") for r in (paper or {})])
    lines = [f"{'':<{width}}" + "".join(f"{h:>15}" for h in heads)]
    for name, acc in rows.items():
        lines.append(f"{name:<{width}}" + "".join(
            f"{'-' if acc.get(k) is None else f'{acc[k]:.2f}':>15}" for k, _ in TABLE1_COLUMNS))
        if paper and name in paper:
            vals = list(paper[name]) + [None] * (len(heads) - len(paper[name]))
            lines.append(f"{'  paper ' + name:<{width}}" + "".join(
                f"{'-' if v is None else f'{v:.2f}':>15}" for v in vals))
    return "\n".join(lines)
