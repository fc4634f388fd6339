"""`hmd train --nproc N` (models/distributed.py): 2 processes against 1 on a tiny model."""
import torch
import torch.multiprocessing as mp

from models.distributed import EXACT_WEIGHTINGS, Replica, convert_batchnorm
from models.network import MultiTaskNet, NetConfig
from models.registry import create_weighting
from models.train import TrainConfig, build_data

TINY = dict(data="synthetic:48", size=32, width=4, decoder_width=8)


def _two_steps(rank: int, world: int, rendezvous: str | None, out: str) -> None:
    """Two float64 steps of every exact weighting (batches of 8, main Adam stepping after each), on
    the whole batch with nn.BatchNorm2d (world 1) or as rank ``rank`` of ``world`` on its shard; rank 0
    saves, per method, every tensor of the model and of the weighting (GALs, aux classifier, loss
    normalisers, task weights, BatchNorm running statistics) and every gradient of the last step."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=world)
    tr, _, frames = build_data(TrainConfig(**TINY))
    gen = torch.Generator().manual_seed(1)
    replica = Replica(rank, world)
    batches = []
    for s in range(2):
        x, t = tr.batch(torch.arange(8 * s, 8 * s + 8), gen)
        if world > 1:
            x, t = replica.shard(x, t)
        batches.append((x.double(), {k: (v.double() if v.is_floating_point() else v) for k, v in t.items()}))
    saved = {}
    for method in EXACT_WEIGHTINGS:
        torch.manual_seed(0)
        model = MultiTaskNet(NetConfig(num_classes=len(frames.class_names), width=4, decoder_width=8))
        weighting = create_weighting(method, model.tasks)
        if world > 1:
            convert_batchnorm(model)
            weighting.data_parallel = replica
        model.double().eval()
        with torch.no_grad():  # as models.train does: GREAT's GALs and classifier from the feature's shape
            weighting.setup(model, model.encode(batches[0][0][:1]).shape)
        weighting.double()
        params = list(model.parameters()) + weighting.main_parameters()
        optimizer = torch.optim.Adam(params, lr=1e-3)
        for x, t in batches:
            model.train()
            optimizer.zero_grad(set_to_none=True)
            weighting.step(model, x, t)
            if world > 1:
                replica.average_gradients(params)
            optimizer.step()
        tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
        tensors.update({f"method.{k}": v for k, v in weighting.state_dict().items() if torch.is_tensor(v)})
        for prefix, module in (("model", model), ("method", weighting)):
            tensors.update({f"grad.{prefix}.{k}": p.grad for k, p in module.named_parameters() if p.grad is not None})
        tensors["task_weights"] = torch.tensor(list(weighting.task_weights().values()), dtype=torch.float64)
        saved[method] = tensors
    if rank == 0:
        torch.save(saved, out)
    if world > 1:
        dist.destroy_process_group()


def test_two_processes_train_as_one_on_the_whole_batch(tmp_path):
    # float64, so that rounding does not hide a real difference: 1e-9 relative, per tensor. GREAT's
    # aux classifier gradients catch a missing shard correction (its inputs would be 2x the whole batch's
    # per-sample gradients), GradNorm's weights a norm taken before the all-reduce
    _two_steps(0, 1, None, str(tmp_path / "one.pt"))
    # forked, not spawned as `launch` does: the ranks inherit this process's imports (torch, the models,
    # the optimizers' lazy torch._dynamo), which would cost each spawned rank more CPU than its steps
    mp.start_processes(_two_steps, args=(2, f"file://{tmp_path}/rendezvous", str(tmp_path / "two.pt")), nprocs=2,
                       start_method="fork")
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert set(one) == set(two) == {"equal", "uncertainty", "gradnorm", "great"}
    for method in one:
        a_all, b_all = one[method], two[method]
        assert set(a_all) == set(b_all), method
        expected = {"great": ("method.gals.gamma", "grad.method.gals.gamma", "grad.method.aux.fc.weight",
                              "method.aux.stem.1.running_var", "method.normalisers.initial"),
                    "gradnorm": ("method.weights", "grad.method.weights", "method.normalisers.initial"),
                    "uncertainty": ("grad.method.log_vars",)}.get(method, ())
        assert all(k in a_all for k in expected), method
        assert sum(k.startswith("grad.model.") for k in a_all) == len(list(MultiTaskNet(NetConfig(
            num_classes=10, width=4, decoder_width=8)).parameters())), method  # every model parameter has a grad
        for k, a in a_all.items():
            b = b_all[k]
            if not a.is_floating_point():
                assert torch.equal(a, b), (method, k)
                continue
            assert float((a - b).abs().max()) <= 1e-9 * float(a.abs().max()) + 1e-15, (method, k)
        if method == "great":  # the GALs and the classifier moved (not compared at their initial values)
            assert float((a_all["method.gals.gamma"] - 1).abs().max()) > 0


def test_nproc_is_refused_for_a_weighting_it_cannot_run_exactly(tmp_path, capsys):
    from hmd.cli import main

    assert main(["train", "--method", "pcgrad", "--nproc", "2", "--out", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "hmd train: error: --nproc > 1 works with --method equal, uncertainty, gradnorm, great only "
        "(not pcgrad: its step is not written for shards of the batch)"]
    assert not (tmp_path / "run").exists()
    assert main(["train", "--method", "equal", "--nproc", "3", "--batch-size", "8", "--out", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "hmd train: error: --nproc 3: the batch size (8) must be a multiple of it"]
    assert not (tmp_path / "run").exists()
    assert main(["personalise", "base", "--data", "video:x.avi", "--nproc", "3", "--out", str(tmp_path / "p")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "hmd personalise: error: --nproc 3: the batch size (32) must be a multiple of it")
    assert not (tmp_path / "p").exists()


def test_personalise_on_two_processes_gives_the_one_process_candidate(tmp_path, monkeypatch):
    # the cloud job's path (GREAT fine-tuning, frozen BatchNorm, warm-up, replay) through launch: the data
    # sent to both ranks, rank 0's progress lines back to the caller, the candidates' weights alike
    import numpy as np

    import models.distributed as distributed
    from models.personalise import personalise
    from models.train import read_checkpoint, train
    from shared.worlds import render_scene
    from tests.models.fixtures import write_video

    monkeypatch.setattr(distributed, "START_METHOD", "fork")  # spawned ranks would re-import torch: see above
    train(TrainConfig(method="great", epochs=1, batch_size=8, max_steps_per_epoch=2, **TINY), tmp_path / "base",
          log=lambda s: None)
    replay = f"video:{write_video(tmp_path / 'replay.avi', frames=40, size=32)}"  # unlabelled, as the wearer's
    frames = np.stack([render_scene("forest", 3, i, 32)[0] for i in range(20)])
    runs, lines, after = {}, {1: [], 2: []}, {}
    for nproc in (1, 2):
        res = personalise(tmp_path / "base", frames, tmp_path / f"cand{nproc}", base_data=replay, epochs=1,
                          max_steps_per_epoch=2, batch_size=8, log=lines[nproc].append, nproc=nproc)
        runs[nproc] = read_checkpoint(res.run_dir)["model"]
        after[nproc] = {k: v for k, v in res.evaluation["wearer"]["after"].items() if v is not None}
        assert after[nproc] and (res.run_dir / "metrics.json").is_file()
    assert all(abs(after[2][k] - v) <= 1e-4 * v for k, v in after[1].items()), after  # the gate sees one model
    assert any("[great] epoch 1/1 step 2/2" in line for line in lines[2])  # relayed from rank 0
    a, b, base = runs[1], runs[2], read_checkpoint(tmp_path / "base")["model"]
    keys = [k for k in a if a[k].is_floating_point()]
    diff = sum(float(((a[k] - b[k]) ** 2).sum()) for k in keys) ** 0.5
    norm = sum(float((a[k] ** 2).sum()) for k in keys) ** 0.5
    moved = sum(float(((a[k] - base[k]) ** 2).sum()) for k in keys) ** 0.5
    assert diff / norm < 1e-4 and diff < 0.01 * moved, (diff / norm, moved / norm)  # float32 rounding, not training
    # a stop request from the caller (the cloud's should_stop) ends both ranks after the same step
    res = personalise(tmp_path / "base", frames, tmp_path / "stopped", base_data=replay, epochs=1,
                      max_steps_per_epoch=2, batch_size=8, log=lambda s: None, nproc=2, should_stop=lambda: True)
    assert not res.accepted and res.reason == "stopped before an epoch finished"
