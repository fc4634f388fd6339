"""`hmd train --nproc N` (models/distributed.py): 2 processes against 1 on a tiny model."""
import torch
import torch.multiprocessing as mp

from models.distributed import EXACT_WEIGHTINGS, Replica, convert_batchnorm
from models.network import MultiTaskNet, NetConfig
from models.registry import create_weighting
from models.train import TrainConfig, build_data

TINY = dict(data="synthetic:48", size=32, width=4, decoder_width=8)


def _gradients(rank: int, world: int, rendezvous: str | None, out: str) -> None:
    """One float64 step of each exact weighting on a batch of 8: on the whole batch with
    nn.BatchNorm2d (world 1), or as rank ``rank`` of ``world`` on its shard; rank 0 saves the
    averaged gradients and the running statistics."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=world)
    tr, _, frames = build_data(TrainConfig(**TINY))
    x, t = tr.batch(torch.arange(8), torch.Generator().manual_seed(1))
    replica = Replica(rank, world, None)
    if world > 1:
        x, t = replica.shard(x, t)
    x, t = x.double(), {k: (v.double() if v.is_floating_point() else v) for k, v in t.items()}
    saved = {}
    for method in EXACT_WEIGHTINGS:
        torch.manual_seed(0)
        model = MultiTaskNet(NetConfig(num_classes=len(frames.class_names), width=4, decoder_width=8))
        if world > 1:
            convert_batchnorm(model)
        model.double().train()
        weighting = create_weighting(method, model.tasks).double()
        weighting.step(model, x, t)
        params = list(model.parameters()) + weighting.main_parameters()
        if world > 1:
            replica.average_gradients(params)
        saved[method] = [p.grad for p in params] + [b.clone() for n, b in model.named_buffers() if "running" in n]
    if rank == 0:
        torch.save(saved, out)
    if world > 1:
        dist.destroy_process_group()


def test_two_processes_give_the_whole_batch_gradients(tmp_path):
    # float64, so that rounding does not hide a real difference: 1e-9 relative, per tensor
    _gradients(0, 1, None, str(tmp_path / "one.pt"))
    mp.spawn(_gradients, args=(2, f"file://{tmp_path}/rendezvous", str(tmp_path / "two.pt")), nprocs=2)
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert set(one) == set(two) == {"equal", "uncertainty"}
    for method in one:
        assert len(one[method]) == len(two[method]) and all(a is not None for a in one[method])
        for a, b in zip(one[method], two[method]):  # every gradient, then BatchNorm's running statistics
            assert float((a - b).abs().max()) <= 1e-9 * float(a.abs().max()) + 1e-15, method


def test_nproc_is_refused_for_a_weighting_it_cannot_run_exactly(tmp_path, capsys):
    from hmd.cli import main

    assert main(["train", "--method", "great", "--nproc", "2", "--out", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "hmd train: error: --nproc > 1 works with --method equal or uncertainty only "
        "(not great: its step needs the whole batch's per-task gradients)"]
    assert not (tmp_path / "run").exists()
    assert main(["train", "--method", "equal", "--nproc", "3", "--batch-size", "8", "--out", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "hmd train: error: --nproc 3: the batch size (8) must be a multiple of it"]
    assert not (tmp_path / "run").exists()
