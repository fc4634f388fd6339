"""The field's multi-task weightings beside GREAT, registered as ``dwa``, ``pcgrad`` and ``cagrad``
(:mod:`models.registry`), with the interface of :mod:`models.weighting`.

- ``dwa``: Dynamic Weight Average (Liu et al. 2019, the MTAN paper): lambda_k(t) =
  K exp(w_k(t-1)/T) / sum_i exp(w_i(t-1)/T), w_k(t-1) = L_k(t-1) / L_k(t-2) with epoch-averaged
  training losses, T = 2, lambda = 1 for the first two epochs.
- ``pcgrad`` (Yu et al. 2020) and ``cagrad`` (Liu et al. 2021, c = 0.4) act **on the shared
  feature's per-task gradients** g_i = dJ_i/df (LibMTL's ``rep_grad`` structure, the one GREAT
  uses: one backward through every decoder, then one encoder backward with the combined
  gradient), not on the shared parameters' gradients as the papers do: this costs one encoder
  backward instead of K.

The gradients are flattened over the whole batch (one vector per task, as for parameter gradients).
"""
from __future__ import annotations

import torch

from models.weighting import WeightingMethod, loss_logs, per_task_feature_gradients, task_losses


# --- DWA -----------------------------------------------------------------------------------------

def dwa_weights(previous: torch.Tensor, before: torch.Tensor, temperature: float = 2.0) -> torch.Tensor:
    """K softmax(w / T) with w_k = L_k(t-1) / L_k(t-2) (``previous`` / ``before``, epoch averages)."""
    w = previous / before.clamp(min=1e-12)
    return len(w) * torch.softmax(w / temperature, dim=0)


class DynamicWeightAverage(WeightingMethod):
    """sum_k lambda_k J_k with DWA's lambda (above). The epoch-averaged losses are kept as buffers
    (saved with the checkpoint, so a resumed run continues with the same weights); the training
    loop calls :meth:`set_epoch` at the start of every epoch, which closes the previous one."""

    name = "dwa"

    def __init__(self, tasks, temperature: float = 2.0):
        super().__init__(tasks)
        self.temperature = float(temperature)
        k = len(self.tasks)
        self.register_buffer("loss_sum", torch.zeros(k, dtype=torch.float64))  # this epoch's running sums
        self.register_buffer("loss_count", torch.zeros(k, dtype=torch.float64))
        self.register_buffer("history", torch.full((2, k), float("nan"), dtype=torch.float64))  # L(t-2), L(t-1)
        self.register_buffer("epochs_seen", torch.zeros((), dtype=torch.long))
        self.register_buffer("weights", torch.ones(k, dtype=torch.float64))

    def record(self, losses: dict[str, float]) -> None:
        """Add one step's task losses to the current epoch's averages."""
        for t, v in losses.items():
            i = self.tasks.index(t)
            self.loss_sum[i] += float(v)
            self.loss_count[i] += 1

    def close_epoch(self) -> None:
        """The current epoch's averages become L(t-1); the weights follow once two epochs are closed.
        A task absent from a whole epoch keeps its previous average."""
        if float(self.loss_count.sum()) == 0:
            return
        avg = torch.where(self.loss_count > 0, self.loss_sum / self.loss_count.clamp(min=1), self.history[1])
        self.history[0] = self.history[1].clone()
        self.history[1] = avg
        self.epochs_seen += 1
        self.loss_sum.zero_()
        self.loss_count.zero_()
        if int(self.epochs_seen) >= 2 and bool(torch.isfinite(self.history).all()):
            self.weights.copy_(dwa_weights(self.history[1], self.history[0], self.temperature))

    def set_epoch(self, epoch: int, epochs: int) -> None:
        self.close_epoch()

    def step(self, model, x, targets):
        losses = task_losses(self.outputs(model, x), targets)
        w = self.weights.float()
        total = sum(w[self.tasks.index(t)] * j for t, j in losses.items())
        total.backward()
        self.record({t: float(j.detach()) for t, j in losses.items()})
        return loss_logs(losses)

    def task_weights(self):
        return {t: float(v) for t, v in zip(self.tasks, self.weights)}


# --- PCGrad ----------------------------------------------------------------------------------------

def pcgrad_combine(grads: list[torch.Tensor], order: list[list[int]] | None = None) -> torch.Tensor:
    """sum_i g_i^PC, where g_i^PC starts at g_i and, for every other task j in random order,
    loses its component along the ORIGINAL g_j when they conflict (g_i^PC . g_j < 0):
    g_i^PC -= (g_i^PC . g_j) / ||g_j||^2 g_j. ``order[i]``: the order of the others for task i."""
    flat = [g.reshape(-1) for g in grads]
    out = torch.zeros_like(flat[0])
    for i, gi in enumerate(flat):
        others = order[i] if order is not None else \
            [j for j in torch.randperm(len(flat)).tolist() if j != i]
        pc = gi.clone()
        for j in others:
            dot = torch.dot(pc, flat[j])
            if dot < 0:
                pc -= dot / flat[j].pow(2).sum().clamp(min=1e-20) * flat[j]
        out += pc
    return out.view_as(grads[0])


class PCGrad(WeightingMethod):
    """Projecting conflicting gradients on the shared feature's per-task gradients (module docstring):
    decoders step on their own J_i, the encoder on the backward of sum_i g_i^PC."""

    name = "pcgrad"

    def step(self, model, x, targets):
        f, losses, grads = per_task_feature_gradients(model, x, targets, self.tasks, lambda t, j: j)
        f.backward(pcgrad_combine(list(grads.values())))
        return loss_logs(losses)


# --- CAGrad ----------------------------------------------------------------------------------------

def project_to_simplex(v: torch.Tensor) -> torch.Tensor:
    """Euclidean projection onto {w >= 0, sum w = 1} (Duchi et al. 2008)."""
    u, _ = torch.sort(v, descending=True)
    css = torch.cumsum(u, 0) - 1
    k = torch.arange(1, len(v) + 1, dtype=v.dtype)
    rho = int(torch.nonzero(u - css / k > 0).max())
    return (v - css[rho] / (rho + 1)).clamp(min=0)


def cagrad_weights(gram: torch.Tensor, c: float, iters: int = 300) -> torch.Tensor:
    """argmin over the simplex of F(w) = g_w . g_0 + c ||g_0|| ||g_w|| (the dual of CAGrad's
    max_d min_i g_i . d s.t. ||d - g_0|| <= c ||g_0||), with g_w = sum_i w_i g_i and g_0 the mean,
    from the K x K Gram matrix G G^T alone (the official code solves it with scipy's SLSQP). F is
    convex: projected gradient descent with a backtracking step, in float64."""
    a = gram.double()
    a = a / a.diagonal().max().clamp(min=1e-30)  # the argmin does not depend on the scale
    k = len(a)
    b = torch.full((k,), 1.0 / k, dtype=torch.float64)
    cn = c * float(b @ a @ b).__abs__() ** 0.5

    def objective(w: torch.Tensor) -> float:
        return float(w @ a @ b + cn * (w @ a @ w).clamp(min=0).add(1e-30).sqrt())

    w, fw, step = b.clone(), objective(b), 1.0
    for _ in range(iters):
        grad = a @ b + cn * (a @ w) / (w @ a @ w).clamp(min=0).add(1e-30).sqrt()
        step *= 2.0
        while step > 1e-12:
            cand = project_to_simplex(w - step * grad)
            fc = objective(cand)
            if fc < fw:
                break
            step *= 0.5
        else:
            break  # no descent step left: converged
        if fw - fc < 1e-15:
            w, fw = cand, fc
            break
        w, fw = cand, fc
    return w


def cagrad_direction(grads: torch.Tensor, c: float = 0.4, rescale: bool = True) -> torch.Tensor:
    """CAGrad's update for K flattened task gradients (K x d): d = g_0 + (c ||g_0|| / ||g_w||) g_w,
    which maximises the worst task's improvement min_i g_i . d within the ball ||d - g_0|| <= c ||g_0||.
    ``rescale`` divides by 1 + c^2 (the official code's default, ``rescale=1``)."""
    g = grads.reshape(len(grads), -1).double()
    w = cagrad_weights(g @ g.T, c)
    g0 = g.mean(0)
    gw = w @ g
    d = g0 + c * g0.norm() / (gw.norm() + 1e-20) * gw
    if rescale:
        d = d / (1.0 + c * c)
    return d.to(grads.dtype)


class CAGrad(WeightingMethod):
    """Conflict-averse gradient descent (c = 0.4) on the shared feature's per-task gradients (module
    docstring): decoders step on their own J_i, the encoder on the backward of K * d, d CAGrad's
    direction around the MEAN gradient -- times K so that c = 0 is exactly equal weighting's sum."""

    name = "cagrad"

    def __init__(self, tasks, c: float = 0.4):
        super().__init__(tasks)
        self.c = float(c)

    def step(self, model, x, targets):
        f, losses, grads = per_task_feature_gradients(model, x, targets, self.tasks, lambda t, j: j)
        stacked = torch.stack(list(grads.values()))
        d = cagrad_direction(stacked, self.c).view_as(f)
        f.backward(len(grads) * d)
        return loss_logs(losses)


__all__ = ["CAGrad", "DynamicWeightAverage", "PCGrad", "cagrad_direction", "cagrad_weights", "dwa_weights",
           "pcgrad_combine", "project_to_simplex"]
