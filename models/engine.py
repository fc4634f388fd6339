"""The one training engine: epochs with the paper's poly learning-rate multiplier, shuffled
batches, progress lines with an ETA, the divergence check, end-of-epoch evaluation, a
checkpoint hook and resume (start epoch, history and batch-order RNG state restored). Given a
run folder it keeps the training curves there (:mod:`models.curves`: ``curves.jsonl`` as it goes,
``curves.png`` at the end).

Multi-task training (:mod:`models.train`), the defences and the distillation methods
(:mod:`models.train_classifier`) and, through :func:`models.train.train`, personalisation all run
on it; each supplies only its step (what one batch does to the gradients) and its evaluation.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from models.curves import CurveLog
from models.metrics import MetricLogger, check_finite
from models.schedules import poly_multiplier, scale_lr

# one batch: (indices into the training set, the engine's generator) -> logged floats
Step = Callable[[torch.Tensor, torch.Generator], dict[str, float]]


class TrainingEngine:
    """Runs ``epochs`` epochs of ``steps`` batches over ``samples`` training samples.

    Per epoch: every optimizer's lr := initial lr * poly multiplier (plus an optional linear
    warm-up over the first ``warmup_steps`` steps), ``on_epoch(epoch, epochs, multiplier)``
    (the method's own schedules), ``train_mode(model)``, a permutation from :attr:`generator`
    (seeded ``seed + 1``); per step: zero the optimizers' grads, ``step(idx, generator)``,
    step the optimizers. After the epoch ``end_epoch(epoch, multiplier, seconds, train_averages)``
    returns the epoch's record (appended to :attr:`history`), then ``checkpoint(epoch)``. With
    ``run_dir`` every progress report and epoch record is also a line of ``run_dir/curves.jsonl``,
    plotted to ``run_dir/curves.png`` when the run ends.
    """

    def __init__(self, model: nn.Module, optimizers: list[torch.optim.Optimizer], *, samples: int,
                 batch_size: int, epochs: int, seed: int, tag: str, log: Callable[[str], None],
                 max_steps: int | None = None, warmup_steps: int = 0, reports_per_epoch: int = 5,
                 shown: Callable[[str], bool] = lambda key: True, run_dir: str | Path | None = None):
        self.model, self.optimizers = model, optimizers
        self.samples, self.epochs, self.tag, self.log = samples, epochs, tag, log
        self.batch_size = min(batch_size, samples)
        self.steps = max(1, samples // self.batch_size)
        if max_steps:
            self.steps = min(self.steps, max_steps)
        self.warmup_steps = warmup_steps
        self.reports_per_epoch, self.shown = reports_per_epoch, shown
        self.generator = torch.Generator().manual_seed(seed + 1)
        self.history: list[dict[str, Any]] = []
        self.start_epoch = 0
        self.stopped = False
        self.curves = CurveLog(run_dir) if run_dir is not None else None

    def resume(self, epoch: int, history: list[dict[str, Any]], generator_state: torch.Tensor) -> None:
        """Continue after ``epoch`` completed epochs (the caller restores model and optimizers)."""
        self.start_epoch, self.history = epoch, history
        self.generator.set_state(generator_state)

    def run(self, step: Step, end_epoch: Callable[[int, float, float, dict[str, float]], dict[str, Any]], *,
            on_epoch: Callable[[int, int, float], None] | None = None,
            train_mode: Callable[[nn.Module], None] | None = None,
            checkpoint: Callable[[int], None] | None = None,
            should_stop: Callable[[], bool] | None = None) -> list[dict[str, Any]]:
        if self.curves is not None:
            self.curves.start(self.start_epoch)
        try:
            return self._run(step, end_epoch, on_epoch, train_mode, checkpoint, should_stop)
        finally:
            if self.curves is not None:
                self.curves.plot(self.tag)

    def _run(self, step, end_epoch, on_epoch, train_mode, checkpoint, should_stop) -> list[dict[str, Any]]:
        steps, bs = self.steps, self.batch_size
        for epoch in range(self.start_epoch, self.epochs):
            m = poly_multiplier(epoch, self.epochs)
            for opt in self.optimizers:
                scale_lr(opt, m)
            if on_epoch is not None:
                on_epoch(epoch, self.epochs, m)
            if train_mode is not None:
                train_mode(self.model)
            else:
                self.model.train()
            perm = torch.randperm(self.samples, generator=self.generator)
            t0 = time.perf_counter()
            meters = MetricLogger()
            report_every = max(1, steps // self.reports_per_epoch)
            for s in range(steps):
                ts = time.perf_counter()
                idx = perm[s * bs:(s + 1) * bs]
                if self.warmup_steps:
                    for opt in self.optimizers:
                        scale_lr(opt, m * min(1.0, (epoch * steps + s + 1) / self.warmup_steps))
                for opt in self.optimizers:
                    opt.zero_grad(set_to_none=True)
                logs = step(idx, self.generator)
                for opt in self.optimizers:
                    opt.step()
                meters.update(logs, time.perf_counter() - ts)
                check_finite(logs, epoch, s)
                if (s + 1) % report_every == 0 or s + 1 == steps:
                    left = (steps - s - 1) + steps * (self.epochs - epoch - 1)
                    keys = [k for k in sorted(meters.meters) if self.shown(k)]
                    self.log(f"[{self.tag}] epoch {epoch + 1}/{self.epochs} step {s + 1}/{steps} "
                             f"{meters.line(keys, left)}")
                    if self.curves is not None:
                        self.curves.step(epoch + 1, s + 1, epoch * steps + s + 1,
                                         {k: v.avg for k, v in meters.meters.items()},
                                         lr=self.optimizers[0].param_groups[0]["lr"],
                                         seconds_per_step=meters.step_time.avg, eta_s=meters.step_time.avg * left)
                if should_stop is not None and should_stop():
                    self.stopped = True
                    break
            if self.stopped:
                self.log("stop requested: leaving without finishing the epoch (nothing saved for it)")
                break
            self.history.append(end_epoch(epoch, m, time.perf_counter() - t0, meters.averages()))
            if self.curves is not None:
                self.curves.epoch(epoch + 1, (epoch + 1) * steps, self.history[-1])
            if checkpoint is not None:
                checkpoint(epoch)
        return self.history
