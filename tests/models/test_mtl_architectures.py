"""MTAN and ASTMT (models/mtan.py, models/astmt.py): MTAN's masks, ASTMT's reversed discriminator
gradient, checkpoints of both, their ONNX export with the parity check, and the Table 4 method list
and delta-m."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models.astmt import ASTMTNet, ASTMTTraining, ganin_alpha
from models.mtan import MTANNet
from models.mtl_architectures import all_methods, check_pair, method_spec, parse_methods
from models.network import MultiTaskNet, NetConfig
from models.registry import MTL_ARCHITECTURES, create_mtl_architecture, create_weighting
from models.room_network import RoomNet, RoomNetConfig
from models.table4 import delta_m
from shared.errors import UserError
from tests.models.test_registry import task_batch

torch.set_num_threads(1)
CFG = NetConfig(num_classes=3, width=4, decoder_width=8)


def wrapped(name, room=False):
    torch.manual_seed(0)
    base = RoomNet(RoomNetConfig(width=4, decoder_width=8)) if room else MultiTaskNet(CFG)
    return create_mtl_architecture(name, base)


def test_mtan_masks_are_in_unit_interval_and_multiply_the_shared_features():
    net = wrapped("mtan").eval()
    x, _ = task_batch()
    feats = net.encode(x)
    for t in net.tasks:
        masks = net.masks(feats, t)
        assert len(masks) == len(feats) == 3
        for a, p in zip(masks, feats):
            assert a.shape == p.shape and float(a.detach().min()) >= 0.0 and float(a.detach().max()) <= 1.0
            assert float(a.detach().std()) > 0  # a soft mask, not a constant
        torch.testing.assert_close(net.task_feature(feats, t), masks[-1] * feats[-1])
    # masks saturated at 1 pass the shared feature through unchanged: the attention multiplies
    with torch.no_grad():
        for att in net.attention["colour_attention"]:
            att.mask[-2].bias.fill_(60.0)
    torch.testing.assert_close(net.task_feature(feats, "colour"), feats[-1])
    torch.testing.assert_close(net(x)["colour"], net.base.decode({"colour": feats[-1]}, x)["colour"])


def test_astmt_reverses_the_discriminator_gradient_into_the_network():
    method = ASTMTTraining(("colour", "edges"))
    method.setup(wrapped("astmt"), None)
    method.alpha = 0.5
    g = torch.randn(2, CFG.feature_channels, 2, 2, generator=torch.Generator().manual_seed(0), requires_grad=True)
    labels = torch.zeros(2, 2, 2, dtype=torch.long)
    # through the reversal layer
    F.cross_entropy(method.discriminator(method.discriminator_input(g)), labels).backward()
    reversed_grad = g.grad.clone()
    disc_grads = [p.grad.clone() for p in method.discriminator.parameters()]
    g.grad = None
    method.discriminator.zero_grad()
    # the same loss without it
    inp = g / (g.norm(p=2, dim=1, keepdim=True) + 1e-10)
    F.cross_entropy(method.discriminator(inp), labels).backward()
    torch.testing.assert_close(reversed_grad, -0.5 * g.grad)  # the network ascends the discriminator's loss
    for a, p in zip(disc_grads, method.discriminator.parameters()):
        torch.testing.assert_close(a, p.grad)  # the discriminator itself descends it
    assert ganin_alpha(0, 10) == pytest.approx(2 / (1 + np.exp(-1)) - 1) and ganin_alpha(9, 10) > 0.99


def test_astmt_step_trains_every_task_path_and_the_discriminator():
    net = wrapped("astmt").train()
    method = create_weighting("astmt", net.tasks)
    method.setup(net, None)
    before = [p.clone() for p in method.discriminator.parameters()]
    x, targets = task_batch()
    logs = method.step(net, x, targets)
    assert 0.0 <= logs["disc_acc"] <= 1.0 and logs["disc_loss"] > 0
    for t in net.tasks:  # each task's SE modules get gradients from its own loss
        assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in net.excite[f"{t}_excite"].parameters()), t
    assert any(not torch.equal(a, b) for a, b in zip(before, method.discriminator.parameters()))


@pytest.mark.parametrize("name", ["mtan", "astmt"])
def test_architecture_checkpoint_round_trip(name):
    from models.train import model_from_checkpoint

    net = wrapped(name, room=name == "astmt").eval()
    ckpt = {"arch": net.cfg.to_dict(), "model": net.state_dict(), "architecture": name}
    loaded = model_from_checkpoint(ckpt)
    assert type(loaded) is type(net)
    x = torch.rand(2, net.cfg.in_channels, 16, 16)
    for k, v in net(x).items():
        torch.testing.assert_close(loaded(x)[k], v)


@pytest.mark.parametrize("name,room", [("mtan", False), ("astmt", True)])
def test_architecture_exports_to_onnx_with_parity(name, room, tmp_path):
    """The per-task masks and SE modulations become ordinary ONNX ops; the export's own parity check
    (torch vs ONNX Runtime on the frames given) passes, and the graph runs on the headset's runtime."""
    from models.export import PARITY_TOLERANCE, export_onnx, onnx_outputs, torch_outputs

    net = wrapped(name, room=room).eval()
    side = 32 if room else 16
    frames = np.random.default_rng(0).random((2, net.cfg.in_channels, side, side), dtype=np.float32)
    names = [f"c{i}" for i in range(net.cfg.num_classes)]
    manifest = export_onnx(net, tmp_path / "m.onnx", height=side, width=side, class_names=names,
                           version=f"tiny-{name}", parity_frames=frames)
    assert manifest.metrics["export_parity_max_abs"] <= PARITY_TOLERANCE
    assert manifest.task_set == ("room" if room else None)
    for a, b in zip(torch_outputs(net, frames), onnx_outputs(tmp_path / "m.onnx", frames)):
        assert a.shape == b.shape and np.abs(a - b).max() <= PARITY_TOLERANCE


def test_architectures_train_only_with_loss_based_weightings():
    assert MTL_ARCHITECTURES.names() == ["shared", "mtan", "astmt"]
    with pytest.raises(UserError, match="mtan architecture trains with"):
        check_pair("mtan", "great", wrapped("mtan"))
    check_pair("shared", "great", MultiTaskNet(CFG))


def test_hmd_train_refuses_a_pair_before_it_loads_any_data(tmp_path):
    from models.train import TrainConfig, train

    # the data folder does not exist: the pair is refused first, and no run folder is made
    with pytest.raises(UserError, match="mtan architecture trains with"):
        train(TrainConfig(method="great", architecture="mtan", data=f"images:{tmp_path / 'nowhere'}"),
              tmp_path / "run", log=lambda s: None)
    assert not (tmp_path / "run").exists()


def test_the_table4_methods():
    assert all_methods() == ["equal", "uncertainty", "gradnorm", "great", "dwa", "pcgrad", "cagrad", "mtan", "astmt"]
    assert parse_methods("all") == all_methods() and parse_methods("great,mtan") == ["great", "mtan"]
    assert method_spec("mtan") == ("equal", "mtan") and method_spec("astmt") == ("astmt", "astmt")
    assert method_spec("pcgrad") == ("pcgrad", "shared")
    with pytest.raises(UserError, match="unknown methods"):
        parse_methods("equal,nash-mtl")


def test_delta_m_against_equal_weighting_is_sign_corrected():
    results = {"equal": {"a": 1.0, "b": 2.0, "c": None}, "x": {"a": 0.8, "b": 2.2, "c": 5.0}}
    # lower is better: a improves by 20 %, b worsens by 10 %; c has no baseline -> left out
    assert delta_m(results, ("a", "b", "c")) == {"equal": 0.0, "x": pytest.approx(5.0)}
    assert delta_m({"x": {"a": 1.0}}, ("a",)) == {}
