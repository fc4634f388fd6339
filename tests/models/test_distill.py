"""Distillation maths (KD loss, discriminator labels, the reversed signal) and `hmd distill`."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from hmd.cli import main
from models.distill import discriminator_labels, kd_loss
from models.gradients import normalise_per_sample
from models.network import NetConfig
from models.registry import create_classifier, create_distiller

torch.set_num_threads(1)


def input_gradient(logits: torch.Tensor, x: torch.Tensor, labels: torch.Tensor, create_graph: bool) -> torch.Tensor:
    """The reference: per-sample d CE(logits_i, y_i) / d x_i by autograd (sum over the batch)."""
    (g,) = torch.autograd.grad(F.cross_entropy(logits, labels, reduction="sum"), x,
                               create_graph=create_graph, retain_graph=create_graph)
    return g


STUDENT = NetConfig(num_classes=3, width=4, in_channels=3)
TEACHER = NetConfig(num_classes=3, width=4, blocks=(1, 1, 1), in_channels=3)


def nets():
    torch.manual_seed(0)
    return create_classifier("cnn5", STUDENT).double(), create_classifier("resnet", TEACHER).double()


def batch(n=4):
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 3, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def test_kd_loss_against_hand_computation():
    s = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    t = torch.tensor([[2.0, 0.0, 1.0], [1.0, 1.0, 1.0]])
    y = torch.tensor([1, 2])
    T, a = 4.0, 0.3
    pt = torch.softmax(t / T, 1)
    kl = (pt * (pt.log() - torch.log_softmax(s / T, 1))).sum(1).mean()
    ce = -torch.log_softmax(s, 1)[torch.arange(2), y].mean()
    assert float(kd_loss(s, t, y, T, a)) == pytest.approx(float(a * T * T * kl + (1 - a) * ce), rel=1e-6)


def test_discriminator_labels_teacher_one_student_zero():
    assert discriminator_labels(2, 3).tolist() == [1.0, 1.0, 0.0, 0.0, 0.0]


@pytest.mark.parametrize("input_grad,disc_bn,disc_norm", [("explicit", "separate", "none"),
                                                           ("autograd", "separate", "none"),
                                                           ("explicit", "joint", "rms")])
def test_great_distillation_discriminator_and_reversed_signal(input_grad, disc_bn, disc_norm):
    student, teacher = nets()
    alpha = 0.25
    m = create_distiller("great", STUDENT, teacher, alpha=alpha, input_grad=input_grad, disc_bn=disc_bn,
                         disc_norm=disc_norm).double()
    disc = m.discriminator
    x, y = batch()
    sp, dp = list(student.parameters()), list(disc.parameters())
    total, _ = m.loss(student, x, y)
    got = torch.autograd.grad(total, sp + dp)
    # by hand, Algorithm 2: C' = BCE(f(g_t), 1) + BCE(f(g_s), 0), g_s with BN statistics differentiated
    xs = x.clone().requires_grad_(True)
    logits = student(xs)
    g_s = input_gradient(logits, xs, y, create_graph=True)
    xt = x.clone().requires_grad_(True)
    g_t = input_gradient(teacher(xt), xt, y, create_graph=False)
    prep = normalise_per_sample if disc_norm == "rms" else (lambda g: g)
    if disc_bn == "separate":  # the paper's: two discriminator batches
        d = torch.cat([disc(prep(g_t)), disc(prep(g_s))]).squeeze(1)
    else:  # one batch: BN's statistics mix teacher and student gradients
        d = disc(torch.cat([prep(g_t), prep(g_s)])).squeeze(1)
    n = len(y)
    d_teacher = F.binary_cross_entropy_with_logits(d[:n], torch.ones(n, dtype=d.dtype))
    d_student = F.binary_cross_entropy_with_logits(d[n:], torch.zeros(n, dtype=d.dtype))
    ce = F.cross_entropy(logits, y)
    ref_disc = torch.autograd.grad(d_teacher + d_student, dp, retain_graph=True)
    ref_student_adv = torch.autograd.grad(d_teacher + d_student, sp, retain_graph=True, allow_unused=True)
    if disc_bn == "separate":  # only Algorithm 2's term reaches the student: the teacher half does not
        teacher_half = torch.autograd.grad(d_teacher, sp, retain_graph=True, allow_unused=True)
        assert all(t is None or float(t.abs().max()) == 0.0 for t in teacher_half)
    ref_ce = torch.autograd.grad(ce, sp)
    for a, r in zip(got[len(sp):], ref_disc):  # the discriminator descends C'
        torch.testing.assert_close(a, r)
    reversed_seen = 0
    for a, r_adv, r_ce in zip(got[:len(sp)], ref_student_adv, ref_ce):
        r_adv = torch.zeros_like(a) if r_adv is None else r_adv
        # the student: (1 - alpha) CE plus -alpha times the discriminator's gradient
        torch.testing.assert_close(a, (1 - alpha) * r_ce - alpha * r_adv)
        reversed_seen += int(float(r_adv.abs().max()) > 0)
    assert reversed_seen > 3


def test_joint_bn_batch_sends_the_student_a_term_algorithm_2_does_not_have():
    student, teacher = nets()
    x, y = batch()
    grads = {}
    for disc_bn in ("separate", "joint"):
        m = create_distiller("great", STUDENT, teacher, alpha=0.25, disc_bn=disc_bn).double()
        torch.manual_seed(1)
        m.discriminator.load_state_dict(create_distiller("great", STUDENT, teacher).double()
                                        .discriminator.state_dict())
        grads[disc_bn] = torch.autograd.grad(m.loss(student, x, y)[0], list(student.parameters()))
    assert any(not torch.allclose(a, b) for a, b in zip(grads["separate"], grads["joint"]))


def test_hmd_distill_cli_and_bad_input(tmp_path, capsys, pinned_runs):
    teacher = pinned_runs / "defend-great+ce"  # runs of `hmd defend` / `hmd distill` (tests/models/pinned_runs.py)
    opts = json.loads((pinned_runs / "distill-great" / "metrics.json").read_text())["config"]["options"]
    assert opts["alpha"] == 0.1 and opts["grad_bn"] == "detached"  # the paper's alpha; the pinned fast flag
    exact = tmp_path / "exact"
    assert main(["distill", "--teacher", str(teacher), "--method", "great", "--data", "synthetic:24", "--epochs",
                 "1", "--width", "4", "--max-steps", "1", "--out", str(exact)]) == 0
    opts = json.loads((exact / "metrics.json").read_text())["config"]["options"]
    # the paper's defaults, recorded: the student's architecture and width, two BN batches, no normalisation
    assert (opts["grad_bn"], opts["disc_arch"], opts["disc_bn"], opts["disc_norm"]) == ("batch", "cnn5", "separate",
                                                                                        "none")
    assert torch.load(exact / "checkpoint.pt", weights_only=False)["distiller"][
        "discriminator.features.0.weight"].shape[0] == 4  # as wide as the --width 4 student
    kd = tmp_path / "kd"
    assert main(["distill", "--teacher", str(teacher), "--method", "kd", "--fraction", "0.5",
                 "--data", "synthetic:24", "--epochs", "1", "--width", "4", "--max-steps", "1",
                 "--out", str(kd)]) == 0
    m = json.loads((kd / "metrics.json").read_text())
    assert m["fraction"] == 0.5 and m["train_images"] < 24
    assert m["config"]["options"] == {"temperature": 20.0, "alpha": 0.99}  # the paper's sparse-regime defaults
    capsys.readouterr()
    for argv, msg in [
        (["--fraction", "0"], "--fraction"),
        (["--fraction", "1.5"], "--fraction"),
        (["--size", "8"], "trained at 16x16"),
        (["--method", "great", "--disc-width", "0"], "discriminator width"),
    ]:
        assert main(["distill", "--teacher", str(teacher), "--method", "kd", "--data", "synthetic:24",
                     "--out", str(tmp_path / "bad"), *argv]) == 2
        err = capsys.readouterr().err
        assert msg in err and err.count("\n") == 1
    assert main(["distill", "--teacher", str(pinned_runs / "train-great"), "--method", "kd", "--data", "synthetic:24",
                 "--out", str(tmp_path / "bad")]) == 2
    assert "multi-task checkpoint" in capsys.readouterr().err


def test_great_distillation_options():
    from shared.errors import UserError
    student, teacher = nets()
    default = create_distiller("great", STUDENT, teacher)  # the paper's: the (CNN-5) student's, leaky-ReLU 0.2
    assert default.discriminator.name == "cnn5" and default.discriminator.cfg.width == STUDENT.width
    assert default.discriminator.cfg.activation == "leaky" and default.discriminator.cfg.num_classes == 1
    assert isinstance(default.discriminator.features[2], torch.nn.LeakyReLU)
    assert default.discriminator.features[2].negative_slope == 0.2
    assert (default.disc_norm, default.disc_bn) == ("none", "separate")
    cnn5 = create_distiller("great", STUDENT, teacher, disc_arch="cnn5", disc_width=3)
    assert cnn5.discriminator.features[0].out_channels == 3
    with pytest.raises(UserError, match="discriminator width"):
        create_distiller("great", STUDENT, teacher, disc_width=0)
    m = create_distiller("great", STUDENT, teacher, disc_arch="resnet", disc_width=2, grad_bn="detached").double()
    assert (m.input_grad, create_distiller("great", STUDENT, teacher).grad_bn) == ("explicit", "batch")
    assert m.discriminator.encoder.stem[0].out_channels == 2
    x, y = batch()
    fast = torch.autograd.grad(m.loss(student, x, y)[0], list(student.parameters()))
    faithful = create_distiller("great", STUDENT, teacher, disc_arch="resnet", disc_width=2).double()
    faithful.load_state_dict(m.state_dict())
    slow = torch.autograd.grad(faithful.loss(student, x, y)[0], list(student.parameters()))
    assert all(torch.isfinite(a).all() for a in fast)
    assert any(not torch.allclose(a, b) for a, b in zip(fast, slow))  # a different (documented) g_s
    with pytest.raises(UserError, match="grad_bn"):
        create_distiller("great", STUDENT, teacher, grad_bn="eval")


def test_lr_schedule_reaches_the_discriminator_optimiser():
    student, teacher = nets()
    m = create_distiller("great", STUDENT, teacher, disc_lr=4e-3)
    for e, mult in ((0, 1.0), (3, 0.7 ** 0.9)):
        m.set_epoch(e, 10)
        assert m.disc_optimizer.param_groups[0]["lr"] == pytest.approx(4e-3 * mult)
