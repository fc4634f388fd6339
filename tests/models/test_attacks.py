"""Attacks run in eval mode, stay in the eps-ball and in [0, 1], and `hmd attack` end to end."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from hmd.cli import main
from models.attacks import (TABLE1_COLUMNS, fgsm, ifgsm, loss_input_gradient, pgd, pick_targets,
                            robustness_report)

torch.set_num_threads(1)


def mode_sensitive_net(seed: int = 0) -> nn.Module:
    """Dropout and BN: train and eval outputs differ."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5),
                         nn.Flatten(), nn.Linear(4 * 36, 4))


def batch(n=6):
    g = torch.Generator().manual_seed(1)
    x = torch.rand(n, 3, 6, 6, generator=g)
    x[0] = 0.0  # pixels at the range limits: clipping must hold
    x[1] = 1.0
    return x, torch.randint(0, 4, (n,), generator=g)


def all_attacks(model, x, y, eps):
    t = pick_targets(model, x, y, "random", torch.Generator().manual_seed(0))
    return {
        "fgsm": fgsm(model, x, y, eps), "ifgsm": ifgsm(model, x, y, eps, 5),
        "fgsm_t": fgsm(model, x, y, eps, target=t), "ifgsm_t": ifgsm(model, x, y, eps, 5, target=t),
        "pgd": pgd(model, x, y, eps, 5, generator=torch.Generator().manual_seed(0)),
    }


def test_model_really_depends_on_mode():
    model = mode_sensitive_net()
    x, _ = batch()
    model.train()
    a = model(x)
    model.eval()
    assert not torch.allclose(a, model(x))


@pytest.mark.parametrize("eps", [0.0, 0.03, 0.3])
def test_perturbation_in_ball_and_range(eps):
    model = mode_sensitive_net()
    x, y = batch()
    for name, adv in all_attacks(model, x, y, eps).items():
        assert (adv - x).abs().max() <= eps + 1e-6, name
        assert adv.min() >= 0.0 and adv.max() <= 1.0, name


def test_attacks_use_eval_mode_and_restore_it_and_leave_param_grads_alone():
    model = mode_sensitive_net()
    model.train()
    x, y = batch()
    bn = model[1]
    running = bn.running_mean.clone()
    adv = fgsm(model, x, y, 0.1)
    assert model.training and all(m.training for m in model.modules())
    assert torch.equal(bn.running_mean, running)  # no train-mode forward happened
    assert all(p.grad is None for p in model.parameters())
    model.eval()
    expected = (x + 0.1 * loss_input_gradient(model, x, y).sign()).clamp(0, 1)
    torch.testing.assert_close(adv, expected)
    model.train()
    all_attacks(model, x, y, 0.1)
    assert model.training and torch.equal(bn.running_mean, running)


def test_ifgsm_default_step_is_eps_over_k_and_one_step_equals_fgsm():
    model = mode_sensitive_net().eval()
    x, y = batch()
    torch.testing.assert_close(ifgsm(model, x, y, 0.1, steps=1), fgsm(model, x, y, 0.1))
    two = ifgsm(model, x, y, 0.1, steps=2)
    inner = x[2:]  # away from the range limits every step moves each pixel by exactly eps/k
    assert torch.allclose((two[2:] - inner).abs().max(), torch.tensor(0.1), atol=1e-6)


def test_targets_never_the_label_and_worst_is_least_likely():
    model = mode_sensitive_net().eval()
    g = torch.Generator().manual_seed(5)
    x, y = torch.rand(40, 3, 6, 6, generator=g), torch.randint(0, 4, (40,), generator=g)
    for kind in ("random", "worst"):
        t = pick_targets(model, x, y, kind, torch.Generator().manual_seed(0))
        assert (t != y).all()
    logits = model(x).detach()
    worst = pick_targets(model, x, y, "worst")
    least = logits.argmin(1)
    keep = least != y
    assert torch.equal(worst[keep], least[keep])


def test_targeted_fgsm_moves_towards_target():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 36, 4)).eval()
    x = torch.full((8, 3, 6, 6), 0.5)
    y = torch.zeros(8, dtype=torch.long)
    t = torch.full((8,), 2)
    adv = fgsm(model, x, y, 0.1, target=t)
    lp = torch.log_softmax(model(adv), 1)[:, 2]
    assert (lp > torch.log_softmax(model(x), 1)[:, 2]).all()


def test_bad_eps_rejected():
    model = mode_sensitive_net()
    x, y = batch()
    with pytest.raises(ValueError):
        fgsm(model, x, y, 1.5)
    with pytest.raises(ValueError):
        ifgsm(model, x, y, -0.1)


def test_report_values_are_the_accuracies_under_each_attack():
    model, source = mode_sensitive_net().eval(), mode_sensitive_net(seed=1).eval()
    g = torch.Generator().manual_seed(2)
    x, y = torch.rand(24, 3, 6, 6, generator=g), torch.randint(0, 4, (24,), generator=g)
    rep = robustness_report(model, x, y, 0.1, steps=2, train=(x[:8], y[:8]), transfer_from=source)
    acc = rep["accuracy_pct"]
    assert list(acc) == [k for k, _ in TABLE1_COLUMNS]

    def pct(xa, n=24):
        return 100.0 * float((model(xa).argmax(1) == y[:n]).float().mean())
    assert acc["clean"] == pytest.approx(pct(x)) and acc["train"] == pytest.approx(pct(x[:8], 8))
    assert acc["fgsm"] == pytest.approx(pct(fgsm(model, x, y, 0.1)))
    assert acc["ifgsm"] == pytest.approx(pct(ifgsm(model, x, y, 0.1, 2)))
    # crafted on the other model (a different network: its examples are not the model's own)
    assert acc["transfer"] == pytest.approx(pct(ifgsm(source, x, y, 0.1, 2)))
    assert not torch.equal(ifgsm(source, x, y, 0.1, 2), ifgsm(model, x, y, 0.1, 2))
    assert acc["ifgsm"] < acc["clean"]  # the attack works on this model
    assert rep["ifgsm_step_size"] == pytest.approx(0.05)


def test_pgd_starts_at_a_random_point_of_the_ball():
    model = mode_sensitive_net().eval()
    x, y = batch()
    # zero-size steps: what is left is the random start, uniform in the eps-ball (clipped to [0, 1])
    start = pgd(model, x, y, 0.2, steps=1, step_size=0.0, generator=torch.Generator().manual_seed(0))
    noise = torch.rand(x.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    torch.testing.assert_close(start, (x + 0.2 * noise).clamp(0, 1))
    other = pgd(model, x, y, 0.2, steps=1, step_size=0.0, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(start, other)
    assert not torch.equal(pgd(model, x, y, 0.2, 3, generator=torch.Generator().manual_seed(0)),
                           ifgsm(model, x, y, 0.2, 3, step_size=2.5 * 0.2 / 3))  # no random start there


def test_targeted_ifgsm_moves_towards_target_every_step():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 36, 4)).eval()
    x = torch.full((8, 3, 6, 6), 0.5)
    y = torch.zeros(8, dtype=torch.long)
    t = torch.full((8,), 2)
    previous = torch.log_softmax(model(x), 1)[:, 2]
    for k in (1, 2, 4):
        lp = torch.log_softmax(model(ifgsm(model, x, y, 0.1 * k / 4, k, step_size=0.025, target=t)), 1)[:, 2]
        assert (lp > previous).all()
        previous = lp


def test_hmd_attack_cli(tmp_path, capsys, pinned_runs):
    d = pinned_runs / "defend-great+ce"  # a classifier trained by `hmd defend` (tests/models/pinned_runs.py)
    src = pinned_runs / "distill-great"  # another network: the transfer source
    rc = main(["attack", str(d), "--eps", "0.1", "--steps", "2", "--limit", "8", "--train-limit", "8",
               "--transfer-from", str(src), "--json", str(tmp_path / "a.json")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "iFGSM 2 steps of 0.05" in out and "Transfer" in out
    rep = json.loads((tmp_path / "a.json").read_text())
    assert rep["accuracy_pct"]["transfer"] is not None and rep["eps"] == 0.1
    assert rep["transfer_from"] == str(src)
    assert main(["attack", str(d), "--eps", "1.5"]) == 2
    assert "must be in [0, 1]" in capsys.readouterr().err
    assert main(["attack", str(tmp_path / "missing"), "--eps", "0.1"]) == 2
