"""Properties every weighting method must have, and the maths of GREAT, GradNorm, uncertainty."""
import math

import pytest
import torch
import torch.nn.functional as F

from models.network import TASKS, MultiTaskNet, NetConfig
from models.gradients import reverse_gradient
from models.registry import WEIGHTINGS, create_weighting
from models.weighting import GradNorm, UncertaintyWeighting, per_task_feature_gradients, task_losses
from models.weighting_great import GreatWeighting
from shared.errors import UserError


def tiny_net(seed=0):
    torch.manual_seed(seed)
    return MultiTaskNet(NetConfig(num_classes=3, width=4, decoder_width=8))


def batch(n=6, size=16, seed=0, labelled=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, size, size, generator=g)
    labels = torch.randint(0, 3, (n,), generator=g)
    if not labelled:
        labels[:] = -1
    targets = {"class": labels, "colour": torch.rand(n, 3, size, size, generator=g),
               "edges": (torch.rand(n, 1, size, size, generator=g) > 0.8).float(),
               "denoised": x.clone()}
    return x, targets


def grads_of(module):
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in module.parameters()]


def test_registry_lists_the_paper_methods():
    assert {"equal", "gradnorm", "uncertainty", "great"} <= set(WEIGHTINGS.names())
    with pytest.raises(UserError, match="great"):
        create_weighting("nope")


def test_unlabelled_batch_trains_dense_tasks_only():
    model = tiny_net()
    x, targets = batch(labelled=False)
    losses = task_losses(model(x), targets)
    assert set(losses) == {"colour", "edges", "denoised"}
    method = create_weighting("great")
    logs = method.step(model, x, targets)
    assert "loss_class" not in logs
    assert all(p.grad is None or float(p.grad.abs().sum()) == 0 for p in model.head("class").parameters())
    assert math.isnan(float(method.normalisers.initial[0]))  # no class normaliser yet


def test_gals_act_in_the_backward_pass_only():
    x, targets = batch()
    runs = {}
    for name, gamma in (("ones", None), ("random", 3)):
        model = tiny_net().train()
        method = create_weighting("great")
        with torch.no_grad():
            method.setup(model, model.encode(x[:1]).shape)
            if gamma is not None:
                g = torch.Generator().manual_seed(gamma)
                method.gals.gamma.copy_(0.5 + torch.rand(method.gals.gamma.shape, generator=g))
        model.zero_grad()
        logs = method.step(model, x, targets)
        runs[name] = (logs, grads_of(model.encoder), [grads_of(model.head(t)) for t in TASKS], model)
    # the forward (every task loss, every decoder's gradient) does not see the GALs ...
    for t in TASKS:
        assert runs["ones"][0][f"loss_{t}"] == runs["random"][0][f"loss_{t}"]
    for a, b in zip(runs["ones"][2], runs["random"][2]):
        for p, q in zip(a, b):
            torch.testing.assert_close(p, q)
    # ... the encoder's gradient does
    assert any(not torch.allclose(p, q) for p, q in zip(runs["ones"][1], runs["random"][1]))
    # and they live in the method, not in the network that is exported
    model = runs["random"][3]
    assert not any("gamma" in n or "aux" in n for n, _ in model.named_parameters())
    assert not any("gamma" in n for n in model.state_dict())


def test_great_encoder_receives_exactly_sum_of_gamma_times_task_gradients():
    model = tiny_net().train()
    x, targets = batch()
    method = create_weighting("great")
    with torch.no_grad():
        method.setup(model, model.encode(x[:1]).shape)
        # non-uniform gammas, so sum_i gamma_i g_i differs from sum_i g_i
        method.gals.gamma.copy_(0.5 + torch.rand(method.gals.gamma.shape, generator=torch.Generator().manual_seed(3)))
    gamma = method.gals.gamma.detach().clone()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.zero_grad()
    method.step(model, x, targets)
    got_encoder = grads_of(model.encoder)
    got_heads = {t: grads_of(model.head(t)) for t in TASKS}
    J0 = {t: method.normalisers[t] for t in TASKS}

    # hand computation on a fresh copy of the same weights
    ref = tiny_net()
    ref.load_state_dict(state)
    ref.train()
    f = ref.encode(x)
    out = ref.decode(f)
    losses = task_losses(out, targets)
    enc_params = list(ref.encoder.parameters())
    combined = torch.zeros_like(f)
    plain_sum = torch.zeros_like(f)
    for i, t in enumerate(TASKS):
        c = losses[t] / J0[t]
        (g,) = torch.autograd.grad(c, f, retain_graph=True)
        combined += gamma[i] * g
        plain_sum += g
        expect_head = torch.autograd.grad(c, list(ref.head(t).parameters()), retain_graph=True)
        for a, b in zip(got_heads[t], expect_head):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-9)
    expect = torch.autograd.grad(f, enc_params, grad_outputs=combined, retain_graph=True)
    for a, b in zip(got_encoder, expect):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-9)
    unaligned = torch.autograd.grad(f, enc_params, grad_outputs=plain_sum)
    assert any(not torch.allclose(a, b, rtol=1e-3, atol=1e-9) for a, b in zip(got_encoder, unaligned))


def test_gal_update_is_the_reverse_of_the_aux_classifier_gradient():
    model = tiny_net().train()
    x, targets = batch()
    method = create_weighting("great")
    with torch.no_grad():
        method.setup(model, model.encode(x[:1]).shape)
    _, _, grads = per_task_feature_gradients(model, x, targets, TASKS, lambda t, j: j)
    gamma = method.gals.gamma

    inp, labels = method.aux_inputs(grads, targets, reverse=False)
    loss = F.cross_entropy(method.aux(inp), labels)
    own_gamma, *own_aux = torch.autograd.grad(loss, [gamma] + list(method.aux.parameters()))
    inp_r, labels_r = method.aux_inputs(grads, targets, reverse=True)
    loss_r = F.cross_entropy(method.aux(inp_r), labels_r)
    rev_gamma, *rev_aux = torch.autograd.grad(loss_r, [gamma] + list(method.aux.parameters()))
    assert float(own_gamma.abs().sum()) > 0
    torch.testing.assert_close(rev_gamma, -own_gamma)  # GALs ascend C'
    for a, b in zip(rev_aux, own_aux):  # the classifier itself still descends C'
        torch.testing.assert_close(a, b)
    # the class task contributes one aux sample per labelled example, labels are task indices
    assert sorted(set(labels.tolist())) == [0, 1, 2, 3]


def test_gradient_reversal_flips_only_the_sign():
    x = torch.randn(5, requires_grad=True)
    (reverse_gradient(x) * torch.arange(5.0)).sum().backward()
    torch.testing.assert_close(x.grad, -torch.arange(5.0))


def test_great_step_keeps_gammas_above_the_floor():
    model = tiny_net().train()
    x, targets = batch()
    method = GreatWeighting(TASKS, gal_lr=0.5, gal_floor=0.05)  # a huge lr: some entries would go negative without the clamp
    method.step(model, x, targets)
    assert float(method.gals.gamma.detach().min()) >= 0.05 - 1e-7
    assert not torch.equal(method.gals.gamma.detach(), torch.ones_like(method.gals.gamma))


@pytest.mark.parametrize("aux_norm", ["none", "rms"])
def test_great_step_moves_gammas_up_the_aux_loss(aux_norm):
    import copy

    model = tiny_net().train()
    x, targets = batch()
    method = GreatWeighting(TASKS, gal_lr=1e-2, aux_norm=aux_norm)
    with torch.no_grad():
        method.setup(model, model.encode(x[:1]).shape)
    aux_before = copy.deepcopy(method.aux)
    gamma_before = method.gals.gamma.detach().clone()
    method.step(model, x, targets)
    # the same task gradients the step saw (C_i = J_i / J_i^0), judged by the classifier before its step
    _, _, grads = per_task_feature_gradients(model, x, targets, TASKS, lambda t, j: j / method.normalisers[t])

    def aux_loss(gamma):
        with torch.no_grad():
            method.gals.gamma.copy_(gamma)
            inp, labels = method.aux_inputs(grads, targets, reverse=False)
            return float(F.cross_entropy(aux_before(inp), labels))
    gamma_after = method.gals.gamma.detach().clone()
    assert aux_loss(gamma_after) > aux_loss(gamma_before)  # the GALs ascend C'


def test_normalisers_are_the_initial_losses():
    model = tiny_net().train()
    x, targets = batch()
    expected = {t: float(v.detach()) for t, v in task_losses(model(x), targets).items()}
    method = create_weighting("great")
    method.step(model, x, targets)
    for t in TASKS:
        assert float(method.normalisers[t]) == pytest.approx(expected[t], rel=1e-5)
    first = method.normalisers.initial.clone()
    method.step(model, *batch(seed=1))  # later batches never move them
    torch.testing.assert_close(method.normalisers.initial, first)


def test_uncertainty_weighting_follows_kendall():
    m = UncertaintyWeighting(TASKS)
    with torch.no_grad():
        m.log_vars.copy_(torch.tensor([0.0, 1.0, -1.0, 0.5]))
    losses = {t: torch.tensor(v) for t, v in zip(TASKS, [2.0, 0.5, 0.25, 1.0])}
    s = [0.0, 1.0, -1.0, 0.5]
    expect = sum(l / (2 * math.exp(si)) + si / 2 for l, si in zip([2.0, 0.5, 0.25, 1.0], s))
    assert float(m.weighted_total(losses).detach()) == pytest.approx(expect, rel=1e-6)
    raw = [1 / (2 * math.exp(si)) for si in s]
    w = m.task_weights()
    assert sum(w.values()) == pytest.approx(1.0)
    for t, r in zip(TASKS, raw):
        assert w[t] == pytest.approx(r / sum(raw), rel=1e-5)


def test_gradnorm_loss_and_weight_update_follow_chen_et_al():
    m = GradNorm(TASKS, alpha=0.6)
    with torch.no_grad():
        m.weights.copy_(torch.tensor([1.0, 2.0, 0.5, 0.5]))
    m.normalisers.update({t: torch.tensor(v) for t, v in zip(TASKS, [2.0, 1.0, 1.0, 1.0])})
    losses = {t: torch.tensor(v) for t, v in zip(TASKS, [1.0, 0.9, 0.5, 0.2])}
    norms = {t: torch.tensor(v) for t, v in zip(TASKS, [0.3, 0.1, 0.4, 0.2])}
    # hand computation
    w = [1.0, 2.0, 0.5, 0.5]
    G = [wi * n for wi, n in zip(w, [0.3, 0.1, 0.4, 0.2])]
    Gbar = sum(G) / 4
    L = [1.0 / 2.0, 0.9, 0.5, 0.2]
    r = [l / (sum(L) / 4) for l in L]
    target = [Gbar * ri ** 0.6 for ri in r]
    expect = sum(abs(g - t) for g, t in zip(G, target))
    loss = m.gradnorm_loss(losses, norms)
    assert float(loss.detach()) == pytest.approx(expect, rel=1e-5)
    (grad,) = torch.autograd.grad(loss, m.weights)
    expect_grad = [math.copysign(n, g - t) for n, g, t in zip([0.3, 0.1, 0.4, 0.2], G, target)]
    torch.testing.assert_close(grad, torch.tensor(expect_grad), rtol=1e-5, atol=1e-7)


def test_gradnorm_step_renormalises_weights_to_the_task_count():
    model = tiny_net().train()
    m = create_weighting("gradnorm", alpha=1.5, weight_lr=0.05)
    for s in range(3):
        m.step(model, *batch(seed=s))
    w = m.weights.detach()
    assert float(w.sum()) == pytest.approx(len(TASKS), rel=1e-5)
    assert not torch.allclose(w, torch.ones_like(w))
    assert float(w.min()) > 0


def test_gradnorm_uses_this_steps_gradient_norms():
    model = tiny_net().train()
    method = GradNorm(TASKS)
    seen = []
    own_loss = method.gradnorm_loss

    def spy(losses, norms):
        seen.append({t: float(v) for t, v in norms.items()})
        return own_loss(losses, norms)
    method.gradnorm_loss = spy
    for seed in (0, 1):
        x, targets = batch(seed=seed)
        # by hand: G_i = ||dJ_i/dW|| at this step's weights and batch (w_i factored out)
        losses = task_losses(model(x), targets)
        W = GradNorm.shared_layer(model)
        expect = {t: float(torch.autograd.grad(j, W, retain_graph=True)[0].norm()) for t, j in losses.items()}
        model.zero_grad()
        method.step(model, x, targets)
        with torch.no_grad():
            for p in model.parameters():  # a main-network step: the next norms must be recomputed
                p.sub_(1e-2 * p.grad.sign())
        assert seen[-1] == pytest.approx(expect, rel=1e-4)
    assert seen[0] != pytest.approx(seen[1], rel=1e-3)


@pytest.mark.parametrize("name", ["gradnorm", "great"])
def test_lr_schedule_reaches_the_methods_own_optimisers(name):
    model = tiny_net().train()
    method = create_weighting(name)
    x, targets = batch()
    method.step(model, x, targets)  # GREAT builds its classifier and GALs on the first step
    initial = [[g["lr"] for g in o.param_groups] for o in method._own_optimizers()]
    assert initial
    method.set_lr_multiplier(0.25)
    for o, lrs in zip(method._own_optimizers(), initial):
        assert [g["lr"] for g in o.param_groups] == pytest.approx([0.25 * lr for lr in lrs])
    method.set_lr_multiplier(0.5)  # relative to the initial rate, not compounded
    for o, lrs in zip(method._own_optimizers(), initial):
        assert [g["lr"] for g in o.param_groups] == pytest.approx([0.5 * lr for lr in lrs])


def test_aux_stride_chooses_the_task_classifiers_first_conv_stride():
    """Default: stride 2 on a feature map of at least 4x4 (a deviation for cost); --aux-stride 1 is
    the paper's ResNet-11; hmd train passes the flag through."""
    from models.cli_train import method_options

    model = tiny_net()
    x, _ = batch(size=32)
    shape = model.encode(x[:1]).shape
    assert min(shape[2:]) >= 4
    strides = {}
    for option in (None, 1, 2):
        method = GreatWeighting(TASKS, aux_stride=option)
        method.setup(model, shape)
        strides[option] = method.aux.stem[0].stride
    assert strides == {None: (2, 2), 1: (1, 1), 2: (2, 2)}
    with pytest.raises(UserError):
        GreatWeighting(TASKS, aux_stride=3)
    args = type("Args", (), {"method": "great", "gal_lr": 1e-4, "aux_lr": 1e-3, "aux_norm": "none",
                             "gal_floor": None, "aux_stride": 1})()
    assert method_options(args)["aux_stride"] == 1
