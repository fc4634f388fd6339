"""GREAT / GREACE maths, the defence registry, the multi-task class-head hook and `hmd defend`."""
from __future__ import annotations

import argparse
import json

import pytest
import torch
from torch import nn
import torch.nn.functional as F

from hmd.cli import main
from models.checkpoints import load_classifier
from models.defence import GradientAdversarialDefence, create_class_defence, masked_grad_outputs
from models.greace import greace_surrogate
from models.gradients import normalise_per_sample, scale_gradient
from models.input_gradients import forward_with_input_vjp
from models.network import MultiTaskNet, NetConfig
from models.registry import DEFENCES, create_classifier, create_defence
from models.schedules import ramp

torch.set_num_threads(1)
TINY = NetConfig(num_classes=3, width=4, blocks=(1, 1, 1), in_channels=3)


def masked_input_gradient(logits: torch.Tensor, x: torch.Tensor, labels: torch.Tensor,
                          create_graph: bool = True) -> torch.Tensor:
    """The reference: g = d CE / dx with the logit gradient masked to the true class, by autograd."""
    (g,) = torch.autograd.grad(logits, x, grad_outputs=masked_grad_outputs(logits, labels),
                               create_graph=create_graph, retain_graph=True)
    return g


def tiny_batch(n: int = 4, size: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g), torch.randint(0, 3, (n,), generator=g)


def test_registry_names():
    assert DEFENCES.names() == ["none", "fgsm-at", "great", "greace", "great+ce"]


def test_masked_gradient_is_p_y_minus_one_times_logit_gradient():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 16, 3)).double()
    x = torch.rand(5, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 1, 2, 1, 0])
    logits = net(x)
    g = masked_input_gradient(logits, x, y, create_graph=False)
    p = torch.softmax(logits.detach(), 1)
    for i in range(5):
        (da_y,) = torch.autograd.grad(logits[i, y[i]], x, retain_graph=True)
        torch.testing.assert_close(g[i], (p[i, y[i]] - 1) * da_y[i], rtol=1e-10, atol=1e-12)


def test_greace_changes_only_negative_logit_gradients_by_beta_p_aux():
    torch.manual_seed(0)
    b, c, beta = 4, 5, 2.5
    logits = torch.randn(b, c, requires_grad=True)
    aux_logits = torch.randn(b, c, requires_grad=True)
    y = torch.tensor([0, 3, 4, 1])
    (plain,) = torch.autograd.grad(F.cross_entropy(logits, y), logits)
    (with_greace,) = torch.autograd.grad(F.cross_entropy(logits, y) + beta * greace_surrogate(logits, aux_logits, y),
                                         logits)
    expected = beta * torch.softmax(aux_logits.detach(), 1) / b  # the CE is a batch mean
    expected[torch.arange(b), y] = 0.0
    torch.testing.assert_close(with_greace - plain, expected)
    # the surrogate sends nothing into the aux network (sg on p')
    assert torch.autograd.grad(greace_surrogate(logits, aux_logits, y), aux_logits, allow_unused=True)[0] is None


def test_scale_gradient_is_identity_forward_and_scales_backward():
    x = torch.randn(3, requires_grad=True)
    out = scale_gradient(x, -0.7)
    assert torch.equal(out, x)
    (gx,) = torch.autograd.grad((out * torch.tensor([1.0, 2.0, 3.0])).sum(), x)
    torch.testing.assert_close(gx, -0.7 * torch.tensor([1.0, 2.0, 3.0]))


def test_schedules_at_start_and_end():
    assert ramp(1.0, 0, 10) == 0.0 and ramp(2.0, 10, 10) == pytest.approx(2.0)
    expect = {"great": (1.0, 0.0), "greace": (0.0, 2.0), "great+ce": (1.0, 2.0)}
    for name, (a_max, b_max) in expect.items():
        d = create_defence(name, TINY, alpha_max=1.0, beta_max=2.0)
        d.set_epoch(0, 10)
        assert (d.alpha, d.beta) == (0.0, 0.0)
        d.set_epoch(10, 10)
        assert d.alpha == pytest.approx(a_max) and d.beta == pytest.approx(b_max)
        d.set_epoch(5, 10)  # in between: max * (1 - 0.5^0.9)
        assert d.alpha == pytest.approx(a_max * (1 - 0.5 ** 0.9))


@pytest.mark.parametrize("input_grad,aux_norm", [("explicit", "none"), ("autograd", "none"), ("explicit", "rms")])
def test_reversal_reaches_main_weights_with_opposite_sign_of_aux_gradient(input_grad, aux_norm):
    torch.manual_seed(0)
    model = create_classifier("resnet", TINY).double()
    # the paper-faithful g: BN batch statistics differentiated
    d: GradientAdversarialDefence = create_defence("great", TINY, aux_norm=aux_norm, grad_bn="batch",
                                                   input_grad=input_grad).double()
    d.alpha = 0.3
    x, y = tiny_batch()
    x = x.double()
    params = [p for p in model.parameters()]
    # the defence's contribution alone (no CE), through its own loss
    total, _ = d.loss(model, x, y, include_ce=False)
    got = torch.autograd.grad(total, params + list(d.aux.parameters()), allow_unused=True)
    # by hand: the aux loss on the masked gradient, differentiated through g
    xr = x.clone().requires_grad_(True)
    g = masked_input_gradient(model(xr), xr, y, create_graph=True)
    aux_loss = F.cross_entropy(d.aux(normalise_per_sample(g) if aux_norm == "rms" else g), y)
    ref = torch.autograd.grad(aux_loss, params + list(d.aux.parameters()), allow_unused=True)
    n = len(params)
    compared = 0
    for a, r in zip(got[:n], ref[:n]):
        if r is None or float(r.abs().max()) == 0.0:
            continue
        torch.testing.assert_close(a, -0.3 * r)  # main net: -alpha times the aux-loss gradient
        compared += 1
    assert compared > 5
    for a, r in zip(got[n:], ref[n:]):  # aux net: descends its own loss
        torch.testing.assert_close(a, r)


def test_alpha_zero_sends_nothing_to_the_main_network_and_still_trains_the_aux():
    torch.manual_seed(0)
    model = create_classifier("resnet", TINY)
    d = create_defence("great", TINY, grad_bn="batch")
    d.set_epoch(0, 10)  # the first epoch: alpha = 0
    assert d.alpha == 0.0
    x, y = tiny_batch()
    aux_before = [p.detach().clone() for p in d.aux.parameters()]
    d.train_step(model, x, y, include_ce=False)
    assert all(p.grad is None or float(p.grad.abs().max()) == 0.0 for p in model.parameters())
    assert any(not torch.equal(a, p) for a, p in zip(aux_before, d.aux.parameters()))  # the aux stepped


def test_lr_schedule_reaches_the_aux_optimiser():
    d = create_defence("great+ce", TINY, aux_lr=2e-3)
    for e, m in ((0, 1.0), (5, 0.5 ** 0.9), (9, 0.1 ** 0.9)):
        d.set_epoch(e, 10)
        assert d.aux_optimizer.param_groups[0]["lr"] == pytest.approx(2e-3 * m)


def test_fgsm_at_mixes_clean_and_fgsm_samples_at_its_eps():
    from models.attacks import fgsm_step
    from models.batchnorm import FrozenBatchNormStats

    torch.manual_seed(0)
    model = create_classifier("resnet", TINY).train()
    x, y = tiny_batch(n=16)
    d = create_defence("fgsm-at", TINY, seed=7, eps=0.05)
    total, logs = d.loss(model, x, y)
    # by hand: the same per-sample coin (the defence's seeded generator), FGSM at eps 0.05 with frozen BN
    use_adv = torch.rand(16, generator=torch.Generator().manual_seed(7)) < 0.5
    assert 0 < int(use_adv.sum()) < 16 and logs["adv_fraction"] == pytest.approx(float(use_adv.float().mean()))
    with FrozenBatchNormStats(model):
        x_adv = fgsm_step(model, x, y, 0.05)
    assert float((x_adv - x).abs().max()) == pytest.approx(0.05, abs=1e-6)
    x_mix = torch.where(use_adv.view(-1, 1, 1, 1), x_adv, x)
    with FrozenBatchNormStats(model):
        expect = F.cross_entropy(model(x_mix), y)
    torch.testing.assert_close(total, expect)


def test_hmd_defend_passes_fgsm_eps_to_the_defence():
    from models import cli_defend
    from models.cli_common import defence_options

    parser = argparse.ArgumentParser()
    cli_defend.add_arguments(parser)
    args = parser.parse_args(["--method", "fgsm-at", "--fgsm-eps", "0.07", "--out", "x"])
    d = create_defence("fgsm-at", TINY, **defence_options(args))
    assert d.eps == 0.07
    assert create_defence("fgsm-at", TINY, **defence_options(parser.parse_args(["--method", "fgsm-at", "--out",
                                                                                 "x"]))).eps == 0.2


@pytest.mark.parametrize("name", DEFENCES.names())
def test_multitask_hook_accumulates_and_skips_unlabelled(name):
    torch.manual_seed(0)
    model = MultiTaskNet(NetConfig(num_classes=3, width=4, decoder_width=8))
    hook = create_class_defence(name, model)
    hook.set_epoch(1, 2)
    x = torch.rand(4, 1, 16, 16)
    before = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.grad = before[n].clone()
    running = model.encoder.stem[1].running_mean.clone()
    assert hook.step(model, x, {"class": torch.full((4,), -1)}) == {}
    assert all(torch.equal(p.grad, before[n]) for n, p in model.named_parameters())
    logs = hook.step(model, x, {"class": torch.tensor([0, -1, 2, 1])})
    assert torch.equal(model.encoder.stem[1].running_mean, running)  # BN statistics untouched
    changed = [n for n, p in model.named_parameters() if not torch.equal(p.grad, before[n])]
    if name == "none":
        assert logs == {} and not changed  # the undefended baseline adds nothing
    else:
        assert all(k.startswith("defence_") for k in logs) and logs
        assert any(n.startswith("encoder.") for n in changed) and "heads.class_head.fc.weight" in changed
        assert not any(n.startswith("heads.colour_head") for n in changed)  # dense heads untouched


def test_hmd_train_with_defence(pinned_runs):
    m = json.loads((pinned_runs / "train-equal-defence" / "metrics.json").read_text())
    assert "defence_aux_loss" in m["history"][-1]["train"]
    assert m["history"][-1]["train"]["defence_alpha"] > 0
    assert m["config"]["defence"] == "great+ce" and m["config"]["defence_options"] == {"aux_width": 2, "greace": "literal",
                                                                             "aux_norm": "rms", "grad_bn": "detached"}
    ckpt = torch.load(pinned_runs / "train-equal-defence" / "checkpoint.pt", weights_only=False)
    assert ckpt["defence"]["defence.aux.encoder.stem.0.weight"].shape[0] == 2  # the aux net is that wide


def test_hmd_train_reaches_every_defence_option():
    from models import cli_train
    from models.cli_common import DEFENCE_OPTIONS

    parser = argparse.ArgumentParser()
    cli_train.add_arguments(parser)
    args = parser.parse_args(["--out", "x", "--defence", "great+ce", "--defence-alpha-max", "0.5",
                              "--defence-beta-max", "3", "--defence-aux-lr", "0.01", "--defence-aux-width", "3",
                              "--defence-aux-norm", "none", "--defence-fgsm-eps", "0.1", "--defence-grad-bn", "batch",
                              "--defence-aux-arch", "cnn5", "--defence-input-grad", "autograd",
                              "--defence-greace", "literal"])
    options = cli_train.defence_options(args, given_only=True)
    assert options == {"alpha_max": 0.5, "beta_max": 3.0, "aux_lr": 0.01, "aux_width": 3, "aux_norm": "none",
                        "eps": 0.1, "grad_bn": "batch", "aux_arch": "cnn5", "input_grad": "autograd",
                        "greace": "literal"}
    assert set(options) == {key for _, key, *_ in DEFENCE_OPTIONS}
    d = create_defence("great+ce", TINY, **options)  # every option is one the defences take
    assert (d.alpha_max, d.beta_max, d.aux_norm, d.grad_bn, d.input_grad, d.greace_variant) == \
        (0.5, 3.0, "none", "batch", "autograd", "literal")
    assert (d.aux.name, d.aux.cfg.width, d.aux_optimizer.param_groups[0]["lr"]) == ("cnn5", 3, 0.01)
    assert cli_train.defence_options(parser.parse_args(["--out", "x"]), given_only=True) == {}


def test_hmd_train_defence_options_need_a_defence(tmp_path, capsys):
    assert main(["train", "--defence-alpha-max", "0.5", "--out", str(tmp_path / "x")]) == 2
    assert "--defence-* options need --defence" in capsys.readouterr().err


def test_hmd_defend_writes_checkpoint_and_metrics(pinned_runs):
    out = pinned_runs / "defend-great+ce"
    m = json.loads((out / "metrics.json").read_text())
    assert m["method"] == "great+ce" and len(m["history"]) == 2 and m["final_alpha"] > 0
    model, ckpt = load_classifier(out)
    assert ckpt["method"] == "great+ce"
    assert model(torch.rand(2, 3, 16, 16)).shape == (2, len(ckpt["class_names"]))
    assert "held-out" in json.loads((pinned_runs / "printed.json").read_text())["defend-great+ce"]


def test_hmd_defend_bad_input(tmp_path, capsys):
    rc = main(["defend", "--method", "fgsm-at", "--fgsm-eps", "1.5", "--data", "synthetic:16", "--size", "8",
               "--out", str(tmp_path / "x")])
    assert rc == 2 and "--fgsm-eps" in capsys.readouterr().err
    assert main(["defend", "--method", "none", "--size", "12", "--out", str(tmp_path / "y")]) == 2


@pytest.mark.parametrize("arch,size", [("resnet", 12), ("cnn5", 12), ("cnn5", 32), ("cnn5", 64)])
@pytest.mark.parametrize("train", [True, False])
def test_explicit_input_gradient_matches_autograd_to_second_order(arch, size, train):
    """CNN-5 at 12 (adaptive pooling to 8x8), 32 (no pooling) and 64 (2x2 average pooling)."""
    cfg = NetConfig(num_classes=3, width=4, blocks=(1, 2, 1), in_channels=3)
    for activation in ("relu", "leaky"):
        torch.manual_seed(0)
        a = create_classifier(arch, NetConfig(**{**cfg.to_dict(), "activation": activation})).double().train(train)
        b = create_classifier(arch, a.cfg).double().train(train)
        b.load_state_dict(a.state_dict())
        x = torch.rand(5, 3, size, size, dtype=torch.float64)
        v, w = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3, size, size, dtype=torch.float64)
        xr = x.clone().requires_grad_(True)
        logits = a(xr)
        (g,) = torch.autograd.grad(logits, xr, v, create_graph=True)
        ref = torch.autograd.grad((g * w).sum() + logits.square().sum(), list(a.parameters()), allow_unused=True)
        logits2, vjp = forward_with_input_vjp(b, x, "batch")
        g2 = vjp(v)
        got = torch.autograd.grad((g2 * w).sum() + logits2.square().sum(), list(b.parameters()), allow_unused=True)
        torch.testing.assert_close(logits2, logits)
        torch.testing.assert_close(g2, g)
        for r, o in zip(ref, got):
            torch.testing.assert_close(torch.zeros(()).double() if o is None else o,
                                       torch.zeros(()).double() if r is None else r)
        for (n, s1), s2 in zip(a.state_dict().items(), b.state_dict().values()):  # BN running stats alike
            torch.testing.assert_close(s2, s1, msg=n)
    assert forward_with_input_vjp(nn.Sequential(nn.Flatten(), nn.Linear(12, 3)), x) is None  # -> autograd


@pytest.mark.parametrize("side", [8, 16, 12, 5])
def test_pool_to_is_adaptive_average_pooling(side):
    from models.classifier import pool_to

    h = torch.randn(2, 3, side, side, requires_grad=True)
    ref = nn.AdaptiveAvgPool2d(8)(h)
    torch.testing.assert_close(pool_to(h, 8), ref)
    g = torch.randn_like(ref)
    torch.testing.assert_close(torch.autograd.grad(pool_to(h, 8), h, g)[0], torch.autograd.grad(ref, h, g)[0])


def test_detached_bn_gradient_is_the_gradient_with_batch_statistics_as_constants():
    """grad_bn="detached": g and its theta-derivative are those of the network whose BN layers
    normalise with this batch's statistics held constant (eval mode with running := batch stats)."""
    torch.manual_seed(0)
    model = create_classifier("resnet", TINY).double()
    x, y = tiny_batch()
    x = x.double()
    stats = {}
    hooks = [m.register_forward_hook(lambda m, i, o: stats.__setitem__(m, i[0].detach()))
             for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    frozen = create_classifier("resnet", TINY).double()
    frozen.load_state_dict(model.state_dict())
    for m, fm in zip(model.modules(), frozen.modules()):
        if m in stats:
            fm.running_mean.copy_(stats[m].mean((0, 2, 3)))
            fm.running_var.copy_(stats[m].var((0, 2, 3), unbiased=False))
    frozen.eval()
    params = list(model.parameters())
    d = create_defence("great", TINY, grad_bn="detached").double()
    assert d.aux_norm == "none" and d.input_grad == "explicit"  # the defaults
    assert create_defence("great", TINY).grad_bn == "batch"  # the paper's maths by default
    d.alpha = 0.3
    total, _ = d.loss(model, x, y, include_ce=False)
    got = torch.autograd.grad(total, params, allow_unused=True)
    # the factor p_y - 1 still comes from the train-mode forward (statistics differentiated there)
    xr = x.clone().requires_grad_(True)
    frozen_logits, train_logits = frozen(xr), model(x)
    torch.testing.assert_close(frozen_logits, train_logits)
    (g,) = torch.autograd.grad(frozen_logits, xr, masked_grad_outputs(train_logits, y), create_graph=True)
    aux_loss = F.cross_entropy(d.aux(g), y)
    ref_frozen = torch.autograd.grad(aux_loss, list(frozen.parameters()), retain_graph=True, allow_unused=True)
    ref_factor = torch.autograd.grad(aux_loss, params, allow_unused=True)
    compared = 0
    for a, r1, r2 in zip(got, ref_frozen, ref_factor):
        r = sum(t for t in (r1, r2) if t is not None)
        if not isinstance(r, torch.Tensor) or float(r.abs().max()) == 0.0:
            continue
        torch.testing.assert_close(a, -0.3 * r)
        compared += 1
    assert compared > 5


def test_gradient_options_are_checked():
    from shared.errors import UserError
    with pytest.raises(UserError, match="grad_bn"):
        create_defence("great", TINY, grad_bn="eval")
    with pytest.raises(UserError, match="input_grad"):
        create_defence("great", TINY, input_grad="fast")


def test_aux_classifier_is_the_papers_copy_by_default_and_narrower_on_request(tmp_path, capsys):
    from shared.errors import UserError
    cfg = NetConfig(num_classes=3, width=8, in_channels=3)
    copy = create_defence("great+ce", cfg)
    main_net = create_classifier("resnet", cfg)
    assert [p.shape for p in copy.aux.parameters()] == [p.shape for p in main_net.parameters()]
    assert copy.aux.cfg.activation == "leaky" and copy.aux.cfg.num_classes == 3
    assert isinstance(copy.aux.encoder.stem[2], nn.LeakyReLU) and copy.aux.encoder.stem[2].negative_slope == 0.2
    half = create_defence("great+ce", cfg, aux_width=4)
    assert half.aux.cfg.width == 4
    with pytest.raises(UserError, match="aux width"):
        create_defence("great", cfg, aux_width=0)
    assert main(["defend", "--method", "great", "--aux-width", "0", "--data", "synthetic:16", "--size", "8",
                 "--out", str(tmp_path / "x")]) == 2
    assert "aux width" in capsys.readouterr().err
