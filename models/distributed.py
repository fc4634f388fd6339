"""Data-parallel multi-task training on CPU (`hmd train --nproc N`, `hmd personalise --nproc N`,
the cloud worker's ``job_nproc``; issue 15 step 4).

:func:`launch` starts N processes with torch.multiprocessing (spawn), joined by the gloo backend
over a ``file://`` rendezvous, one torch thread each. Every rank runs :func:`models.train.train`
with a :class:`Replica`: each builds the whole global batch exactly as one process would (same
batch order, same noise draws from the engine's generator) and keeps its contiguous 1/N slice;
every BatchNorm is a :class:`SyncBatchNorm2d` (batch statistics all-reduced across ranks, with
autograd), and the gradients of the main optimizer's parameters are averaged before it steps. So
the forward and backward are those of one process on the whole batch, and the weights after
every step equal the single-process run's up to float rounding (tests/models/test_distributed.py).

Exact for the weightings in :data:`EXACT_WEIGHTINGS`. The weighting sees the replica as its
``data_parallel`` (:class:`models.weighting.SingleProcess` in one process): a rank's losses are
means over its shard, so its per-sample gradients at the shared feature are N x the whole
batch's. GREAT divides them by N before its auxiliary classifier sees them (whose BatchNorms are
synced and whose and the GALs' gradients are averaged before their optimizers step), and takes
its loss normalisers J^0 as the whole batch's; GradNorm averages each task's gradient of the
last shared layer over the ranks before taking its norm, uses the whole batch's losses for its
loss ratios and averages its weights' gradient. No weighting draws random numbers in its step.
Refused: the other weightings and ``--defence`` (their steps are not written for shards).
Only rank 0 evaluates and writes the run folder.
"""
from __future__ import annotations

import dataclasses
import datetime
import os
import shutil
import tempfile
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn
import torch.distributed.nn.functional as dist_fn

from shared.errors import UserError

EXACT_WEIGHTINGS = ("equal", "uncertainty", "gradnorm", "great")
# how the ranks start: spawn (a fresh interpreter; safe from any parent, a worker thread included). Tests
# fork, so that the ranks inherit the test process's imports instead of paying for them
START_METHOD = "spawn"


class SyncBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training-mode statistics are those of the global batch (all ranks).

    Mean and biased variance come from all-reduced sums over equal shards (two passes, as one process computes
    them); :func:`torch.distributed.nn.functional.all_reduce` carries the gradient back to every
    rank's samples. Running statistics are updated as ``nn.BatchNorm2d`` does on the whole batch
    (unbiased variance), so they stay identical on every rank. Its state dict is BatchNorm2d's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training or not self.track_running_stats) or not dist.is_initialized():
            return super().forward(x)
        dims = (0, 2, 3)
        n = float(x.numel() // x.shape[1] * dist.get_world_size())  # the shards are equal (Replica.check)
        mean = dist_fn.all_reduce(x.sum(dims)) / n
        centred = x - mean[None, :, None, None]
        var = dist_fn.all_reduce((centred * centred).sum(dims)) / n
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = (1.0 / float(self.num_batches_tracked)) if self.momentum is None else self.momentum
                self.running_mean.mul_(1 - factor).add_(mean.detach(), alpha=factor)
                self.running_var.mul_(1 - factor).add_(var.detach() * (n / max(1.0, n - 1)), alpha=factor)
        y = centred * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y


def convert_batchnorm(module: nn.Module) -> nn.Module:
    """Swap every ``nn.BatchNorm2d`` in ``module`` for a :class:`SyncBatchNorm2d` with the same
    parameters and buffers (in place; returns ``module``)."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            sync = SyncBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                   child.track_running_stats)
            sync.load_state_dict(child.state_dict())
            sync.train(child.training)
            setattr(module, name, sync)
        else:
            convert_batchnorm(child)
    return module


class Replica:
    """One rank's part in :func:`models.train.train`: which shard it trains on, the gradient and
    log averaging (rank 0 alone evaluates and writes the run folder)."""

    def __init__(self, rank: int, world: int):
        self.rank, self.world = rank, world

    def check(self, cfg: Any, train_data: Any) -> None:
        """Refuse what would make the shards' mean losses differ from the global batch's."""
        problem = shard_problem(cfg.batch_size, train_data, self.world)
        if problem:
            raise UserError(problem)

    def convert_batchnorm(self, model: nn.Module) -> nn.Module:
        """Every BatchNorm2d of ``model`` with the whole batch's statistics (:class:`SyncBatchNorm2d`)."""
        return convert_batchnorm(model)

    def barrier(self) -> None:
        dist.barrier()

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` averaged over the ranks (a new tensor; no autograd)."""
        total = t.detach().clone()
        dist.all_reduce(total)
        return total / self.world

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is on one (so that all ranks stop at the same step)."""
        t = torch.tensor([float(flag)])
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def shard(self, x: torch.Tensor, targets: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """This rank's contiguous slice of a global batch (x and every target)."""
        n = len(x) // self.world
        part = slice(self.rank * n, (self.rank + 1) * n)
        return x[part], {k: v[part] for k, v in targets.items()}

    def average_gradients(self, params: list[torch.Tensor]) -> None:
        """Every parameter's .grad := its mean over the ranks (a missing grad counts as zero; it
        stays missing only where no rank has one, as in one process)."""
        have = torch.tensor([float(p.grad is not None) for p in params])
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
        dist.all_reduce(have)
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for p, h in zip(params, have.tolist()):
            k = p.numel()
            p.grad = flat[offset:offset + k].view_as(p).clone() if h else None
            offset += k

    def average_logs(self, logs: dict[str, float]) -> dict[str, float]:
        """The logged shard means averaged over the ranks (the global batch's, for equal shards)."""
        keys = sorted(logs)
        gathered: list[Any] = [None] * self.world
        dist.all_gather_object(gathered, keys)
        if any(k != keys for k in gathered):
            return logs  # a task missing on some shard: keep this rank's own values
        values = torch.tensor([logs[k] for k in keys], dtype=torch.float64)
        dist.all_reduce(values)
        return {k: float(v) / self.world for k, v in zip(keys, values)}


def shard_problem(batch_size: int, train_data: Any, nproc: int) -> str | None:
    """Why ``train_data`` cannot be trained on ``nproc`` equal shards exactly (None: it can). Its
    ``labels`` (-1: unlabelled) may be a tensor or an array."""
    bs = min(batch_size, len(train_data))
    if bs % nproc:
        return f"--nproc {nproc}: the batch size ({bs}) must be a multiple of it"
    labels = getattr(train_data, "labels", None)
    if labels is not None and bool((labels < 0).any()) and bool((labels >= 0).any()):
        return (f"--nproc {nproc} needs every training frame labelled, or none "
                "(a partly labelled set gives the shards different class-loss means)")
    return None


def check_config(cfg: Any, nproc: int) -> None:
    """One line refusing what ``--nproc`` cannot run exactly (UserError)."""
    if nproc < 1:
        raise UserError("--nproc must be >= 1")
    if nproc > 1 and cfg.method not in EXACT_WEIGHTINGS:
        raise UserError(f"--nproc > 1 works with --method {', '.join(EXACT_WEIGHTINGS)} only "
                        f"(not {cfg.method}: its step is not written for shards of the batch)")
    if cfg.batch_size % nproc:
        raise UserError(f"--nproc {nproc}: the batch size ({cfg.batch_size}) must be a multiple of it")
    if nproc > 1 and cfg.defence:
        raise UserError("--nproc > 1 does not run --defence (its attack needs the whole batch)")


@dataclasses.dataclass
class _Job:
    """What every rank is given (pickled to the spawned processes)."""
    cfg: Any
    out: str
    resume: bool
    command: str | None
    data: Any  # pre-built (train, val, frames) or None
    work: str  # the launch's scratch folder: rendezvous, error file, stop file
    log_queue: Any  # rank 0's progress lines go to the parent's ``log`` (None: rank 0's stderr)
    stoppable: bool  # the parent may ask to stop (its ``should_stop``): every rank polls the stop file

    @property
    def error_file(self) -> str:
        return os.path.join(self.work, "error")

    @property
    def stop_file(self) -> str:
        return os.path.join(self.work, "stop")


def _worker(rank: int, world: int, job: _Job) -> None:
    torch.set_num_threads(1)
    # the autograd all-reduce SyncBatchNorm2d needs: torch 2.13 marks it deprecated in favour of a
    # private module; one warning per BatchNorm per rank would bury the progress lines
    warnings.filterwarnings("ignore", message="torch.distributed.nn.functional.all_reduce is deprecated")
    dist.init_process_group("gloo", init_method=f"file://{job.work}/rendezvous", rank=rank, world_size=world,
                            timeout=datetime.timedelta(minutes=10))
    replica = Replica(rank, world)
    try:
        from models.train import train

        log = (lambda s: None) if rank else (job.log_queue.put if job.log_queue is not None else None)
        stop = (lambda: replica.any(os.path.exists(job.stop_file))) if job.stoppable else None
        train(job.cfg, job.out, resume=job.resume, log=log, data=job.data, should_stop=stop, command=job.command,
              replica=replica)
    except UserError as exc:
        if rank == 0:
            Path(job.error_file).write_text(str(exc))
        raise SystemExit(2) from None
    except BaseException:
        if rank == 0:
            Path(job.error_file).write_text(traceback.format_exc().strip().splitlines()[-1])
        raise
    finally:
        dist.destroy_process_group()


def launch(cfg: Any, out: str | Path, nproc: int, *, resume: bool = False, command: str | None = None,
           data: Any = None, log: Callable[[str], None] | None = None,
           should_stop: Callable[[], bool] | None = None) -> dict[str, Any]:
    """:func:`models.train.train` on ``nproc`` processes (1: in this one); returns rank 0's metrics.

    ``data``, ``log`` and ``should_stop`` are train's: the data is sent to every rank, rank 0's
    progress lines come back to ``log`` here, and ``should_stop`` is polled here (every 0.2 s):
    once it is true, all ranks leave after the same step."""
    import json
    import threading

    import torch.multiprocessing as mp

    check_config(cfg, nproc)
    if nproc == 1:
        from models.train import train

        return train(cfg, out, resume=resume, log=log, data=data, should_stop=should_stop, command=command)
    cfg = dataclasses.replace(cfg, threads=1)
    work = tempfile.mkdtemp(prefix="hmd-ddp-")
    log_queue = mp.get_context(START_METHOD).SimpleQueue() if log is not None else None
    job = _Job(cfg, str(out), resume, command, data, work, log_queue, should_stop is not None)
    done = threading.Event()

    def relay() -> None:  # rank 0's progress lines to ``log``; the stop request to the ranks
        while True:
            while log_queue is not None and not log_queue.empty():
                log(log_queue.get())  # type: ignore[misc]
            if should_stop is not None and not os.path.exists(job.stop_file) and should_stop():
                Path(job.stop_file).touch()
            if done.is_set() and (log_queue is None or log_queue.empty()):
                return
            done.wait(0.2)

    relay_thread = threading.Thread(target=relay, name="hmd-ddp-relay", daemon=True)
    relay_thread.start()
    try:
        try:
            mp.start_processes(_worker, args=(nproc, job), nprocs=nproc, join=True, start_method=START_METHOD)
        except (mp.ProcessRaisedException, mp.ProcessExitedException) as exc:
            msg = Path(job.error_file).read_text() if os.path.exists(job.error_file) else str(exc).strip().splitlines()[-1]
            raise UserError(msg) from None
        finally:
            done.set()
            relay_thread.join()
        return json.loads((Path(out) / "metrics.json").read_text())
    finally:
        shutil.rmtree(work, ignore_errors=True)


def bench(nproc: int = 2, data: str = "synthetic:256", size: int = 64, width: int = 16, batch_size: int = 32,
          steps: int = 8, method: str = "equal") -> dict[str, Any]:
    """One epoch of at most ``steps`` steps on 1 process, then on ``nproc``, side by side: seconds per
    epoch's training loop (the engine's, without data building and evaluation), the speed-up, and
    how far the 2 runs' weights are apart (L2 norm of the difference / L2 norm of the weights)."""
    import math

    from models.train import TrainConfig, read_checkpoint, train

    def cfg() -> Any:
        return TrainConfig(method=method, data=data, size=size, width=width, batch_size=batch_size, epochs=1,
                           max_steps_per_epoch=steps, threads=1)

    def weights(run: Path) -> dict[str, torch.Tensor]:
        return {k: v for k, v in read_checkpoint(run)["model"].items() if v.is_floating_point() and "running" not in k}

    work = Path(tempfile.mkdtemp(prefix="hmd-ddp-bench-"))
    try:
        torch.set_num_threads(1)
        one = train(cfg(), work / "one", log=lambda s: None)
        many = launch(cfg(), work / "many", nproc)
        a, b = weights(work / "one"), weights(work / "many")
        diff = math.sqrt(sum(float(((a[k] - b[k]) ** 2).sum()) for k in a))
        norm = math.sqrt(sum(float((a[k] ** 2).sum()) for k in a))
        t1, tn = one["history"][0]["seconds"], many["history"][0]["seconds"]
        return {"benchmark": "train-nproc", "method": method, "data": data, "size": size, "width": width,
                "batch_size": batch_size, "max_steps": steps, "nproc": nproc, "train_seconds_1": round(t1, 3),
                f"train_seconds_{nproc}": round(tn, 3), f"speedup-{nproc}/1": round(t1 / tn, 3),
                "weights_l2_rel_diff": diff / norm,
                "same_run_files": sorted(p.name for p in (work / "one").iterdir())
                == sorted(p.name for p in (work / "many").iterdir())}
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":  # python -m models.distributed [--nproc 2 --steps 8 ...]: the bench, JSON on stdout
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="python -m models.distributed", description=bench.__doc__)
    for flag, default in (("nproc", 2), ("size", 64), ("width", 16), ("batch-size", 32), ("steps", 8)):
        parser.add_argument(f"--{flag}", type=int, default=default)
    parser.add_argument("--data", default="synthetic:256")
    parser.add_argument("--method", default="equal", choices=EXACT_WEIGHTINGS)
    a = parser.parse_args()
    print(json.dumps(bench(a.nproc, a.data, a.size, a.width, a.batch_size, a.steps, a.method), indent=1))
