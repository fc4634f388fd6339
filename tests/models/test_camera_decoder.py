"""The headset's camera decoder (models/network.py): input skips, residual colour/denoised heads."""
from __future__ import annotations

import torch

from models.network import MultiTaskNet, NetConfig
from models.registry import create_weighting as create_method
from models.weighting import per_task_feature_gradients


def _net(**kw):
    torch.manual_seed(0)
    return MultiTaskNet(NetConfig(width=8, decoder_width=16, decoder="camera", **kw))


def test_residual_heads_start_as_the_input_gray_at_any_aspect():
    net = _net().eval()
    x = torch.rand(2, 1, 24, 32)  # 4:3, not square
    out = net(x)
    assert out["colour"].shape == (2, 3, 24, 32) and out["edges"].shape == (2, 1, 24, 32)
    # the classical "do nothing" denoiser and "show the gray frame in three channels" at init
    assert torch.allclose(out["denoised"], x.clamp(0, 1), atol=2e-2)
    assert torch.allclose(out["colour"], x.expand(-1, 3, -1, -1), atol=2e-2)
    assert out["class"].shape == (2, 6)


def test_eval_clamps_training_does_not():
    net = _net()
    with torch.no_grad():
        net.head("denoised").out.bias.fill_(0.5)
    x = torch.full((1, 1, 16, 16), 0.8)
    net.train()
    assert net(x)["denoised"].max() > 1.0  # the loss sees the unclamped sum (its gradient never stops)
    net.eval()
    assert net(x)["denoised"].max() == 1.0


def test_encoder_gradient_passes_only_through_the_shared_feature():
    """GREAT's GALs act at f: with per-task detached copies of f, the encoder must get no gradient
    from the decoders' input skips (they read the image, which has no parameters before them)."""
    net = _net().train()
    x = torch.rand(4, 1, 16, 24)
    targets = {"class": torch.full((4,), -1), "colour": torch.rand(4, 3, 16, 24),
               "edges": torch.rand(4, 1, 16, 24), "denoised": torch.rand(4, 1, 16, 24)}
    f, losses, grads = per_task_feature_gradients(net, x, targets, net.tasks, lambda t, j: j)
    assert all(p.grad is None for p in net.encoder.parameters())
    for t in ("colour", "edges", "denoised"):
        assert grads[t] is not None and grads[t].abs().sum() > 0
        assert net.head(t).out.weight.grad is not None


def test_every_weighting_trains_the_camera_decoder():
    x = torch.rand(4, 1, 16, 24)
    targets = {"class": torch.tensor([0, 1, -1, 2]), "colour": torch.rand(4, 3, 16, 24),
               "edges": torch.rand(4, 1, 16, 24), "denoised": torch.rand(4, 1, 16, 24)}
    for name in ("equal", "uncertainty", "gradnorm", "great"):
        net = _net().train()
        method = create_method(name)
        with torch.no_grad():
            method.setup(net, net.encode(x).shape)
        opt = torch.optim.Adam(list(net.parameters()) + method.main_parameters(), lr=1e-3)
        before = {k: v.clone() for k, v in net.state_dict().items()}
        opt.zero_grad()
        method.step(net, x, targets)
        opt.step()
        changed = [k for k, v in net.state_dict().items() if v.dtype.is_floating_point and not torch.equal(v, before[k])]
        assert any(k.startswith("encoder.") for k in changed), name
        assert any(k.startswith("heads.colour_head.out") for k in changed), name


def test_old_checkpoints_load_as_the_paper_decoder():
    cfg = NetConfig.from_dict({"num_classes": 6, "width": 8, "blocks": [1, 1, 1], "decoder_width": 16,
                               "in_channels": 1, "mean": 0.5, "std": 0.25, "activation": "relu"})
    assert cfg.decoder == "paper"
