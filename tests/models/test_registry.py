"""Every registered entry, checked for the properties all entries of its table must have (as
timm tests every model): a new architecture, task set, weighting, defence or distillation
method is covered by adding it to models/registry.py."""
from __future__ import annotations

import argparse
import inspect
import math

import pytest
import torch

from models.network import MultiTaskNet, NetConfig
from models.registry import (ARCHITECTURES, DEFENCES, DISTILLERS, TASK_SETS, WEIGHTINGS, create_classifier,
                             create_defence, create_distiller, create_weighting, get_task_set)
from shared.errors import UserError

torch.set_num_threads(1)
CLASSIFIER = NetConfig(num_classes=3, width=4, blocks=(1, 1, 1), in_channels=3)
MULTITASK = NetConfig(num_classes=3, width=4, decoder_width=8)


def image_batch(n: int = 4, size: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g), torch.randint(0, 3, (n,), generator=g)


def task_batch(n: int = 4, size: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, size, size, generator=g)
    return x, {"class": torch.randint(0, 3, (n,), generator=g), "colour": torch.rand(n, 3, size, size, generator=g),
               "edges": (torch.rand(n, 1, size, size, generator=g) > 0.8).float(), "denoised": x.clone()}


def finite_logs(logs: dict[str, float]) -> bool:
    return bool(logs) and all(math.isfinite(v) for v in logs.values())


@pytest.mark.parametrize("registry", [ARCHITECTURES, TASK_SETS, WEIGHTINGS, DEFENCES, DISTILLERS],
                         ids=lambda r: r.kind)
def test_an_unknown_name_is_one_user_error_listing_the_known_names(registry):
    with pytest.raises(UserError) as err:
        registry.get("no-such-entry")
    assert str(err.value).startswith(f"unknown {registry.kind} 'no-such-entry'")
    assert all(name in str(err.value) for name in registry.names())
    for name in registry.names():
        registry.get(name)  # every entry resolves


def test_command_line_choices_are_the_registry_names():
    from models import cli_defend, cli_distill, cli_train

    def choices(module, option):
        parser = argparse.ArgumentParser()
        module.add_arguments(parser)
        return next(a.choices for a in parser._actions if option in a.option_strings)

    assert choices(cli_train, "--method") == WEIGHTINGS.names()
    assert choices(cli_train, "--defence") == DEFENCES.names()
    assert choices(cli_defend, "--method") == DEFENCES.names()
    assert choices(cli_distill, "--method") == DISTILLERS.names()
    assert choices(cli_distill, "--student") == ARCHITECTURES.names()


# --- architectures -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ARCHITECTURES.names())
def test_every_architecture_classifies_and_has_the_explicit_input_gradient(name):
    from models.input_gradients import forward_with_input_vjp

    torch.manual_seed(0)
    model = create_classifier(name, CLASSIFIER).double().eval()
    assert model.name == name and model.cfg == CLASSIFIER  # what a checkpoint records
    x, y = image_batch()
    x = x.double().requires_grad_(True)
    logits = model(x)
    assert logits.shape == (4, 3)
    v = torch.randn_like(logits)
    (ref,) = torch.autograd.grad(logits, x, v)
    explicit = forward_with_input_vjp(model, x.detach())  # the defences' fast double backprop
    assert explicit is not None
    torch.testing.assert_close(explicit[1](v), ref)


# --- task sets -----------------------------------------------------------------------------------

def task_set_network(name: str) -> torch.nn.Module:
    """A tiny network of task set ``name``."""
    from models.room_network import RoomNet, RoomNetConfig

    return {"cifar": lambda: MultiTaskNet(MULTITASK),
            "room": lambda: RoomNet(RoomNetConfig(width=4, decoder_width=8))}[name]()


@pytest.mark.parametrize("name", TASK_SETS.names())
def test_every_task_set_names_heads_of_its_network(name):
    tasks = get_task_set(name)
    assert tasks and len(set(tasks)) == len(tasks) and all(isinstance(t, str) for t in tasks)
    model = task_set_network(name)
    assert model.tasks == tasks and all(isinstance(model.head(t), torch.nn.Module) for t in tasks)


# --- weightings ----------------------------------------------------------------------------------

@pytest.mark.parametrize("tasks", [None, ("colour", "class"), ("edges",)], ids=["default", "subset", "one"])
@pytest.mark.parametrize("name", WEIGHTINGS.names())
def test_every_weighting_trains_its_tasks_for_any_task_tuple(name, tasks):
    torch.manual_seed(0)
    model = MultiTaskNet(MULTITASK).train()
    method = create_weighting(name, tasks)
    tasks = tasks or get_task_set()
    assert method.name == name and method.tasks == tasks
    x, targets = task_batch()
    with torch.no_grad():
        method.setup(model, model.encode(x[:1]).shape)
    opt = torch.optim.Adam(list(model.parameters()) + method.main_parameters(), lr=1e-2)
    logs = method.step(model, x, targets)
    assert finite_logs(logs) and {k for k in logs if k.startswith("loss_")} == {f"loss_{t}" for t in tasks}
    for t in model.tasks:  # the encoder and the heads of its tasks get gradients, no other head does
        got = sum(float(p.grad.abs().sum()) for p in model.head(t).parameters() if p.grad is not None)
        assert (got > 0) == (t in tasks), t
    assert all(torch.isfinite(p.grad).all() for p in model.encoder.parameters())
    opt.step()
    weights = method.task_weights()
    assert set(weights) == set(tasks) and all(w > 0 for w in weights.values())
    # its state (own optimizers included) restores into a fresh instance
    fresh = create_weighting(name, tasks)
    with torch.no_grad():
        fresh.setup(model, model.encode(x[:1]).shape)
    fresh.load_state_dict(method.state_dict())
    assert fresh.task_weights() == weights
    assert [o.state_dict()["state"].keys() for o in fresh._own_optimizers()] == \
        [o.state_dict()["state"].keys() for o in method._own_optimizers()]


# --- defences ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", DEFENCES.names())
def test_every_defence_trains_a_classifier_step_and_saves_its_state(name):
    torch.manual_seed(0)
    model = create_classifier("resnet", CLASSIFIER)
    d = create_defence(name, CLASSIFIER, eps=0.1, beta_max=1.0, some_other_method_option=3)  # others ignored
    assert d.name == name
    d.set_epoch(1, 2)  # alpha, beta > 0: the double-backprop path
    x, y = image_batch()
    assert finite_logs(d.train_step(model, x, y))
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    d2 = create_defence(name, CLASSIFIER)
    d2.load_state_dict(d.state_dict())
    for a, b in zip(d.state_dict().values(), d2.state_dict().values()):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b)


# --- distillation methods ------------------------------------------------------------------------

@pytest.mark.parametrize("name", DISTILLERS.names())
def test_every_distillation_method_trains_the_student_only(name):
    torch.manual_seed(0)
    student = create_classifier("cnn5", CLASSIFIER)
    teacher = create_classifier("resnet", CLASSIFIER).eval()
    m = create_distiller(name, CLASSIFIER, teacher)
    assert m.name == name
    m.set_epoch(0, 2)
    x, y = image_batch()
    assert finite_logs(m.train_step(student, x, y))
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())  # the teacher is frozen
    assert not any(k.startswith("teacher") for k in m.state_dict())
    create_distiller(name, CLASSIFIER, teacher).load_state_dict(m.state_dict())


# --- every option of every entry is reachable from the command that trains it ---------------------

def _constructor_options(cls, positional: set[str]) -> set[str]:
    return {p.name for p in inspect.signature(cls.__init__).parameters.values()
            if p.name not in positional | {"self"} and p.kind is not p.VAR_KEYWORD}


def _parsed(module, argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return parser.parse_args(argv)


@pytest.mark.parametrize("name", WEIGHTINGS.names())
def test_every_weighting_option_is_reachable_from_hmd_train(name):
    from models import cli_train

    args = _parsed(cli_train, ["--out", "x", "--method", name, "--weight-lr", "0.01", "--gal-floor", "0.01",
                               "--alpha", "1.0", "--aux-stride", "1"])
    options = cli_train.method_options(args)
    assert set(options) == _constructor_options(WEIGHTINGS.get(name), {"tasks"})
    create_weighting(name, None, **options)


@pytest.mark.parametrize("name", DEFENCES.names())
def test_every_defence_option_is_reachable_from_hmd_defend_and_hmd_train(name):
    from models.cli_common import DEFENCE_OPTIONS

    assert _constructor_options(DEFENCES.get(name), {"net_cfg", "seed"}) <= {key for _, key, *_ in DEFENCE_OPTIONS}


@pytest.mark.parametrize("name", DISTILLERS.names())
def test_every_distillation_option_is_reachable_from_hmd_distill(name):
    from models import cli_distill

    args = _parsed(cli_distill, ["--teacher", "t", "--out", "x", "--method", name, "--temperature", "4", "--alpha",
                                 "0.5", "--disc-arch", "cnn5", "--disc-width", "4", "--disc-lr", "0.01",
                                 "--input-grad", "autograd"])
    options = cli_distill.method_options(args)
    assert set(options) == _constructor_options(DISTILLERS.get(name), {"student_cfg", "teacher"})
