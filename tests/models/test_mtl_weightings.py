"""The maths of DWA, PCGrad and CAGrad against hand computations (models/mtl_weightings.py)."""
import math

import pytest
import torch

from models.mtl_weightings import (CAGrad, DynamicWeightAverage, PCGrad, cagrad_direction, pcgrad_combine,
                                   project_to_simplex)
from models.network import MultiTaskNet, NetConfig
from models.weighting import per_task_feature_gradients, task_losses
from tests.models.test_registry import task_batch

torch.set_num_threads(1)


def tiny_net():
    torch.manual_seed(0)
    return MultiTaskNet(NetConfig(num_classes=3, width=4, decoder_width=8)).train()


def encoder_grads(model):
    return [p.grad.clone() for p in model.encoder.parameters()]


def test_dwa_weights_after_two_known_epochs():
    dwa = DynamicWeightAverage(("colour", "edges"))
    dwa.record({"colour": 1.5, "edges": 1.0})
    dwa.record({"colour": 2.5, "edges": 1.0})  # epoch 1 averages: L(1) = (2, 1)
    dwa.set_epoch(1, 5)
    assert dwa.task_weights() == {"colour": 1.0, "edges": 1.0}  # lambda = 1 for the first two epochs
    dwa.record({"colour": 1.0, "edges": 1.0})  # L(2) = (1, 1)
    dwa.set_epoch(2, 5)
    # w = L(2) / L(1) = (0.5, 1); lambda = 2 exp(w / 2) / sum exp(w / 2)
    e1, e2 = math.exp(0.25), math.exp(0.5)
    got = dwa.task_weights()
    assert got["colour"] == pytest.approx(2 * e1 / (e1 + e2), abs=1e-9)  # 0.8757
    assert got["edges"] == pytest.approx(2 * e2 / (e1 + e2), abs=1e-9)  # 1.1243
    assert dwa.set_epoch(3, 5) is None and dwa.task_weights() == got  # an empty epoch changes nothing


def test_dwa_step_weights_each_task_loss():
    x, targets = task_batch()
    tasks = ("colour", "edges")
    dwa = DynamicWeightAverage(tasks)
    dwa.weights.copy_(torch.tensor([0.25, 1.75], dtype=torch.float64))
    model = tiny_net()
    logs = dwa.step(model, x, targets)
    got = encoder_grads(model)
    ref = tiny_net()
    losses = task_losses(ref.decode({t: ref.encode(x) for t in tasks}, x), targets)
    (0.25 * losses["colour"] + 1.75 * losses["edges"]).backward()
    for a, b in zip(got, encoder_grads(ref)):
        torch.testing.assert_close(a, b)
    assert dwa.loss_count.tolist() == [1.0, 1.0] and dwa.loss_sum[0] == pytest.approx(logs["loss_colour"])


def test_pcgrad_projects_two_conflicting_vectors():
    g1, g2 = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0])  # g1 . g2 = -1 < 0
    # g1' = g1 - (-1 / 2) g2 = (0.5, 0.5); g2' = g2 - (-1 / 1) g1 = (0, 1)
    torch.testing.assert_close(pcgrad_combine([g1, g2]), torch.tensor([0.5, 1.5]))
    g3 = torch.tensor([1.0, 1.0])  # no conflict with g1: plain sum
    torch.testing.assert_close(pcgrad_combine([g1, g3]), g1 + g3)


def test_pcgrad_projects_against_the_original_gradients_in_the_given_order():
    g = [torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0]), torch.tensor([0.0, -1.0])]
    # task 0 against task 2 first (no conflict), then task 1: (1,0) + 0.5 (-1,1) = (0.5, 0.5)
    # task 1 against 0: (-1,1) + (1,0) = (0,1); then against 2: (0,1) . (0,-1) = -1 -> (0,0)
    # task 2 against 1: (0,-1) . (-1,1) = -1 -> (0,-1) + 0.5 (-1,1) = (-0.5,-0.5); then against 0:
    # (-0.5,-0.5) . (1,0) = -0.5 -> (0,-0.5). Sum: (0.5, 0)
    got = pcgrad_combine(g, order=[[2, 1], [0, 2], [1, 0]])
    torch.testing.assert_close(got, torch.tensor([0.5, 0.0]))


def test_pcgrad_step_sends_the_projected_sum_to_the_encoder():
    x, targets = task_batch()
    tasks = ("colour", "denoised")  # two tasks: the order does not matter
    model = tiny_net()
    PCGrad(tasks).step(model, x, targets)
    ref = tiny_net()
    f, _, grads = per_task_feature_gradients(ref, x, targets, tasks, lambda t, j: j)
    f.backward(pcgrad_combine(list(grads.values())))
    for a, b in zip(encoder_grads(model), encoder_grads(ref)):
        torch.testing.assert_close(a, b)


def test_cagrad_direction_on_a_symmetric_two_task_example():
    g = torch.tensor([[1.0, 1.0], [-1.0, 1.0]], dtype=torch.float64)
    # by symmetry w = (1/2, 1/2): g_w = g_0 = (0, 1), d = g_0 + c ||g_0|| g_0 / ||g_0|| = (0, 1 + c)
    torch.testing.assert_close(cagrad_direction(g, 0.4, rescale=False), torch.tensor([0.0, 1.4], dtype=torch.float64))
    torch.testing.assert_close(cagrad_direction(g, 0.4), torch.tensor([0.0, 1.4 / 1.16], dtype=torch.float64))
    torch.testing.assert_close(cagrad_direction(g, 0.0), g.mean(0))  # c = 0: the mean gradient


def test_cagrad_maximises_the_worst_task_improvement_within_the_ball():
    gen = torch.Generator().manual_seed(3)
    g = torch.tensor([[2.0, 0.3, -0.5], [-1.0, 1.0, 0.2]], dtype=torch.float64)  # conflicting: g1 . g2 < 0
    c = 0.4
    d = cagrad_direction(g, c, rescale=False)
    g0 = g.mean(0)
    radius = c * float(g0.norm())
    assert float((d - g0).norm()) == pytest.approx(radius, rel=1e-9)  # on the ball's boundary
    worst = float((g @ d).min())
    u = torch.randn(4000, 3, generator=gen, dtype=torch.float64)
    u = u / u.norm(dim=1, keepdim=True) * radius * torch.rand(4000, 1, generator=gen, dtype=torch.float64) ** (1 / 3)
    candidates = (g @ (g0 + u).T).min(0).values
    assert worst >= float(candidates.max()) - 1e-9
    assert worst > float((g @ g0).min()) + 0.1  # and it is far better than the plain mean


def test_simplex_projection():
    torch.testing.assert_close(project_to_simplex(torch.tensor([0.2, 0.9, -1.0], dtype=torch.float64)),
                               torch.tensor([0.15, 0.85, 0.0], dtype=torch.float64))


def test_cagrad_with_c_zero_is_equal_weighting():
    x, targets = task_batch()
    tasks = ("class", "colour", "edges")
    model = tiny_net()
    CAGrad(tasks, c=0.0).step(model, x, targets)
    ref = tiny_net()
    losses = task_losses(ref.decode({t: ref.encode(x) for t in tasks}, x), targets)
    sum(losses.values()).backward()
    for a, b in zip(encoder_grads(model), encoder_grads(ref)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
