"""AutoAttack (Croce & Hein 2020, the standard version RobustBench reports: APGD-CE, APGD-T, FAB-T,
Square) through torchattacks, plus the gradient-masking checks the field uses (Carlini et al. 2019,
"On evaluating adversarial robustness"; Athalye et al. 2018).

Why torchattacks (README, "AutoAttack"): it implements the four attacks of the standard
AutoAttack in PyTorch with the original's parameters (APGD step-size schedule and momentum, DLR
targeted loss, FAB's multi-targeted projection, Square's schedule), needs only torch, numpy and
scipy at import, and runs on CPU tensors. The Adversarial Robustness Toolbox's AutoAttack has a
different default ensemble (no FAB) and pulls scikit-learn and its own classifier wrappers.

The ensemble runs as AutoAttack runs it: each attack only on the samples every earlier attack
failed on, so the AutoAttack accuracy is the worst case per sample. Two columns are measured on
every sample on their own, for the masking checks: APGD-CE (white-box) and Square (black-box,
queries only).

Masking checks (:func:`masking_checks`), each a yes/no with its numbers:

* ``eps_to_zero``: APGD-CE accuracy at eps = 0.5 (an unbounded budget for images in [0, 1]: a
  gray image is reachable) must be <= 5 %;
* ``blackbox_not_better``: Square (black-box) and the transfer attack must not beat APGD-CE
  (white-box) by more than 2 points -- if they do, the gradients lie;
* ``more_steps_not_worse``: APGD-CE with 4x the steps must not leave more than 2 points more
  accuracy than with 1x (more iterations must not help the defence);
* ``iterative_beats_single_step``: PGD must not leave more accuracy than FGSM (from the Table 1
  columns, when given).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from shared.errors import UserError

from models.attacks import check_eps, eval_mode

STANDARD = ("apgd-ce", "apgd-t", "fab-t", "square")
# the standard version's budgets (Croce & Hein: 100 iterations, 9 target classes, 5000 queries)
PAPER_STEPS, PAPER_QUERIES = 100, 5000
MASKING_EPS = 0.5
TOLERANCE_PTS = 2.0
ZERO_PCT = 5.0


def _torchattacks():
    try:
        import torchattacks
    except ImportError:  # pragma: no cover - setup.sh installs it
        raise UserError("--autoattack needs torchattacks (./scripts/setup.sh installs it: "
                        "pip install --no-deps torchattacks==3.5.1)") from None
    return torchattacks


def make_attack(name: str, model: nn.Module, eps: float, n_classes: int, steps: int = PAPER_STEPS,
                queries: int = PAPER_QUERIES, seed: int = 0):
    """One attack of the standard AutoAttack, as AutoAttack configures it (L-inf, one restart)."""
    ta = _torchattacks()
    if name == "apgd-ce":
        return ta.APGD(model, norm="Linf", eps=eps, steps=steps, n_restarts=1, loss="ce", seed=seed)
    if name == "apgd-t":
        return ta.APGDT(model, norm="Linf", eps=eps, steps=steps, n_restarts=1, n_classes=n_classes, seed=seed)
    if name == "fab-t":
        return ta.FAB(model, norm="Linf", eps=eps, steps=steps, n_restarts=1, multi_targeted=True,
                      n_classes=n_classes, seed=seed)
    if name == "square":
        return ta.Square(model, norm="Linf", eps=eps, n_queries=queries, n_restarts=1, seed=seed)
    raise ValueError(f"unknown attack {name!r} (choose from {', '.join(STANDARD)})")


def _adversarial(attack, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    with eval_mode(model), torch.enable_grad():
        adv = attack(x, y).detach()
    # every attack must stay in the ball and in [0, 1] (FAB minimises the norm and may step outside eps)
    ok = ((adv - x).abs().flatten(1).max(1).values <= eps + 1e-6) & (adv.min() >= 0) & (adv.max() <= 1)
    return torch.where(ok.view(-1, *([1] * (x.dim() - 1))), adv, x)


@torch.no_grad()
def _robust(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with eval_mode(model):
        return model(x).argmax(1) == y


def autoattack_report(model: nn.Module, x: torch.Tensor, labels: torch.Tensor, eps: float, n_classes: int,
                      steps: int = PAPER_STEPS, queries: int = PAPER_QUERIES, seed: int = 0,
                      batch_size: int = 200, masking: bool = True) -> dict[str, Any]:
    """Accuracy (%) under the standard AutoAttack and its parts; with ``masking`` the APGD-CE runs the
    masking checks need (eps 0.5, 4x the steps)."""
    eps = check_eps(eps)
    if steps < 1 or queries < 1:
        raise UserError("--aa-steps and --aa-queries must be >= 1")
    targeted = n_classes >= 4  # the targeted DLR loss reads the 4th-largest logit
    robust = {k: torch.zeros(0, dtype=torch.bool) for k in ("clean", "apgd-ce", "square", "autoattack",
                                                             "apgd-ce-4x", "apgd-ce-eps0.5")}
    for s in range(0, len(labels), batch_size):
        xb, yb = x[s:s + batch_size], labels[s:s + batch_size]
        clean = _robust(model, xb, yb)
        per = {"clean": clean}
        for name in ("apgd-ce", "square"):  # on every sample, for the masking checks
            per[name] = clean & _robust(model, _adversarial(
                make_attack(name, model, eps, n_classes, steps, queries, seed), model, xb, yb, eps), yb)
        left = per["apgd-ce"] & per["square"]
        for name in (("apgd-t", "fab-t") if targeted else ()):  # the ensemble: only where all failed so far
            idx = left.nonzero().flatten()
            if len(idx):
                adv = _adversarial(make_attack(name, model, eps, n_classes, steps, queries, seed), model,
                                   xb[idx], yb[idx], eps)
                left[idx] = _robust(model, adv, yb[idx])
        per["autoattack"] = left
        if masking:
            per["apgd-ce-4x"] = clean & _robust(model, _adversarial(
                make_attack("apgd-ce", model, eps, n_classes, 4 * steps, queries, seed), model, xb, yb, eps), yb)
            per["apgd-ce-eps0.5"] = clean & _robust(model, _adversarial(
                make_attack("apgd-ce", model, MASKING_EPS, n_classes, steps, queries, seed), model, xb, yb,
                MASKING_EPS), yb)
        for k, v in per.items():
            robust[k] = torch.cat([robust[k], v])
    n = max(1, len(labels))
    acc = {k: 100.0 * float(v.sum()) / n for k, v in robust.items() if len(v) or k in ("clean", "autoattack")}
    return {"accuracy_pct": acc, "eps": eps, "samples": len(labels), "steps": steps, "queries": queries,
            "attacks": list(STANDARD if targeted else ("apgd-ce", "square")),
            "note": None if targeted else f"{n_classes} classes: APGD-T and FAB-T need >= 4 (skipped)",
            "version": "standard (APGD-CE, APGD-T, FAB-T, Square; torchattacks "
                       f"{_torchattacks().__version__})"}


def masking_checks(aa: dict[str, float], table1: dict[str, float | None] | None = None) -> dict[str, Any]:
    """The gradient-masking checks on the accuracies of :func:`autoattack_report` (and, when given,
    the Table 1 columns of :func:`models.attacks.robustness_report`): name -> {"ok", "detail"}."""
    t1 = table1 or {}
    checks: dict[str, dict[str, Any]] = {}
    white = aa["apgd-ce"]
    if "apgd-ce-eps0.5" in aa:
        checks["eps_to_zero"] = {"ok": aa["apgd-ce-eps0.5"] <= ZERO_PCT,
                                 "detail": f"APGD-CE at eps {MASKING_EPS}: {aa['apgd-ce-eps0.5']:.1f} %"}
    black = [(n, v) for n, v in (("Square", aa.get("square")), ("transfer", t1.get("transfer"))) if v is not None]
    worst = min(black, key=lambda t: t[1]) if black else None
    if worst is not None:
        checks["blackbox_not_better"] = {"ok": worst[1] >= white - TOLERANCE_PTS,
                                         "detail": f"{worst[0]} {worst[1]:.1f} % vs APGD-CE {white:.1f} %"}
    if "apgd-ce-4x" in aa:
        checks["more_steps_not_worse"] = {"ok": aa["apgd-ce-4x"] <= white + TOLERANCE_PTS,
                                          "detail": f"APGD-CE 4x steps {aa['apgd-ce-4x']:.1f} % vs 1x {white:.1f} %"}
    if t1.get("pgd") is not None and t1.get("fgsm") is not None:
        checks["iterative_beats_single_step"] = {"ok": t1["pgd"] <= t1["fgsm"] + TOLERANCE_PTS,
                                                 "detail": f"PGD {t1['pgd']:.1f} % vs FGSM {t1['fgsm']:.1f} %"}
    return checks


def verdict(aa: dict[str, float], checks: dict[str, Any]) -> str:
    """One plain line: masking signs first, then what AutoAttack leaves."""
    failed = [k for k, c in checks.items() if not c["ok"]]
    if failed:
        return ("gradient masking suspected (" + "; ".join(checks[k]["detail"] for k in failed)
                + f"); AutoAttack leaves {aa['autoattack']:.1f} %")
    if aa["autoattack"] <= ZERO_PCT:
        return f"does not survive AutoAttack ({aa['autoattack']:.1f} %); no masking signs"
    return f"survives AutoAttack at {aa['autoattack']:.1f} % (clean {aa['clean']:.1f} %); no masking signs"


def evaluate(model: nn.Module, x: torch.Tensor, labels: torch.Tensor, eps: float, n_classes: int,
             table1: dict[str, float | None] | None = None, **options: Any) -> dict[str, Any]:
    """:func:`autoattack_report` plus its masking checks and verdict."""
    rep = autoattack_report(model, x, labels, eps, n_classes, **options)
    checks = masking_checks(rep["accuracy_pct"], table1)
    rep.update({"masking_checks": checks, "verdict": verdict(rep["accuracy_pct"], checks)})
    return rep

