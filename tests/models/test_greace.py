"""GREACE readings of the paper's eq. 6 (issue #17): the logit gradients by hand, and training at
the patent's MNIST strength (beta_max 20) on small rendered digits keeps the classifier."""
from __future__ import annotations

import json
import math

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hmd.cli import main
from models.labelled import LabelledImages
from models.train_classifier import train_defended
from models.registry import create_defence
from models.greace import DEFAULT_GREACE, GREACE_VARIANTS, greace_delta, greace_loss
from models.network import NetConfig
from shared.errors import UserError


@pytest.fixture(autouse=True)
def _one_thread():
    """Small tensors: one thread is faster than two, and immune to a busy machine's spin-waits."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


LN2, LN3 = math.log(2.0), math.log(3.0)
# two samples, three classes, chosen so that every softmax is a simple fraction:
#   sample 0: a = (ln 2, 0, 0) -> p = (1/2, 1/4, 1/4); a' = (0, ln 3, 0) -> p' = (1/5, 3/5, 1/5); y = 0
#   sample 1: a = (0, 0, 0)    -> p = (1/3, 1/3, 1/3); a' = (ln 3, 0, 0) -> p' = (3/5, 1/5, 1/5); y = 2
LOGITS = [[LN2, 0.0, 0.0], [0.0, 0.0, 0.0]]
AUX = [[0.0, LN3, 0.0], [LN3, 0.0, 0.0]]
LABELS = [0, 2]
BETA = 2.0
CE_GRAD = [[-1 / 2, 1 / 4, 1 / 4], [1 / 3, 1 / 3, -2 / 3]]  # p - onehot(y), per sample
HAND = {
    # the formula as printed: + beta p'_k on the negatives
    "literal": [[-1 / 2, 1 / 4 + 2 * 3 / 5, 1 / 4 + 2 * 1 / 5], [1 / 3 + 2 * 3 / 5, 1 / 3 + 2 * 1 / 5, -2 / 3]],
    # the negatives' own gradient re-weighted: (1 + beta p'_k) p_k
    "reweight": [[-1 / 2, (1 + 2 * 3 / 5) / 4, (1 + 2 * 1 / 5) / 4], [(1 + 2 * 3 / 5) / 3, (1 + 2 * 1 / 5) / 3, -2 / 3]],
    # + beta p'_k (1 - p_y): 1 - p_y is 1/2 for sample 0, 2/3 for sample 1
    "scaled": [[-1 / 2, 1 / 4 + 2 * 3 / 5 / 2, 1 / 4 + 2 * 1 / 5 / 2],
               [1 / 3 + 2 * 3 / 5 * 2 / 3, 1 / 3 + 2 * 1 / 5 * 2 / 3, -2 / 3]],
}


def _normalised_by_hand() -> list[list[float]]:
    rows = []
    for ce, lit in zip(CE_GRAD, HAND["literal"]):
        scale = math.sqrt(sum(v * v for v in ce) / sum(v * v for v in lit))
        rows.append([v * scale for v in lit])
    return rows


HAND["normalised"] = _normalised_by_hand()


@pytest.mark.parametrize("variant", GREACE_VARIANTS)
def test_greace_logit_gradient_matches_the_hand_computation(variant):
    logits = torch.tensor(LOGITS, dtype=torch.float64, requires_grad=True)
    aux = torch.tensor(AUX, dtype=torch.float64, requires_grad=True)
    y = torch.tensor(LABELS)
    total = F.cross_entropy(logits, y) + greace_loss(variant, logits, aux, y, BETA)
    (grad,) = torch.autograd.grad(total, logits)
    expected = torch.tensor(HAND[variant], dtype=torch.float64) / 2  # batch means over two samples
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-12)
    # the true class keeps exactly the cross-entropy's gradient in the additive readings
    if variant != "normalised":
        torch.testing.assert_close(grad[[0, 1], LABELS], torch.tensor([-1 / 4, -1 / 3], dtype=torch.float64))
    # nothing flows into the aux network through the GREACE term
    assert torch.autograd.grad(greace_loss(variant, logits, aux, y, BETA), aux, allow_unused=True)[0] is None


def test_reweight_vanishes_with_the_cross_entropy_and_literal_does_not():
    """The point of issue #17: once a sample is learnt (p_y -> 1) the literal push stays beta p'_k."""
    y = torch.tensor([0])
    aux = torch.zeros(1, 4, dtype=torch.float64)  # a confused aux network: p' uniform
    learnt = torch.tensor([[30.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    literal = greace_delta("literal", learnt, aux, y, 20.0)
    reweight = greace_delta(DEFAULT_GREACE, learnt, aux, y, 20.0)
    torch.testing.assert_close(literal, torch.tensor([[0.0, 5.0, 5.0, 5.0]], dtype=torch.float64))
    assert float(reweight.abs().max()) < 1e-11


def test_greace_option_reaches_the_defence_and_is_checked():
    cfg = NetConfig(num_classes=3, width=4, in_channels=3)
    assert create_defence("greace", cfg).greace_variant == DEFAULT_GREACE == "reweight"
    assert create_defence("great+ce", cfg, greace="literal").greace_variant == "literal"
    with pytest.raises(UserError, match="greace"):
        create_defence("greace", cfg, greace="additive")


def test_hmd_defend_greace_flag(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["defend", "--method", "greace", "--greace", "bogus", "--out", str(tmp_path / "x")])
    assert exit_info.value.code == 2 and "--greace" in capsys.readouterr().err
    out = tmp_path / "lit"
    rc = main(["defend", "--method", "greace", "--greace", "literal", "--data", "synthetic:16", "--size", "8",
               "--epochs", "1", "--width", "4", "--batch-size", "8", "--out", str(out)])
    assert rc == 0
    assert json.loads((out / "metrics.json").read_text())["config"]["options"]["greace"] == "literal"


def rendered_digits(n: int, size: int = 16, seed: int = 0) -> LabelledImages:
    """Digits 0-9 drawn with cv2.putText (random font, scale, stroke, shift, slant, noise)."""
    rng = np.random.default_rng(seed)
    fonts = [cv2.FONT_HERSHEY_SIMPLEX, cv2.FONT_HERSHEY_DUPLEX, cv2.FONT_HERSHEY_COMPLEX]
    x = np.empty((n, size, size), np.float32)
    y = np.arange(n) % 10
    for i, d in enumerate(y):
        font = fonts[rng.integers(len(fonts))]
        canvas = np.zeros((32, 32), np.uint8)
        scale = rng.uniform(0.8, 0.95)
        (w, h), _ = cv2.getTextSize(str(d), font, scale, 2)
        org = (int((32 - w) / 2 + rng.integers(-2, 3)), int((32 + h) / 2 + rng.integers(-2, 3)))
        cv2.putText(canvas, str(d), org, font, scale, 255, int(rng.integers(2, 4)), cv2.LINE_AA)
        shear = np.float32([[1, rng.uniform(-0.15, 0.15), 0], [0, 1, 0]])
        canvas = cv2.warpAffine(canvas, shear, (32, 32))
        im = cv2.resize(canvas, (size, size), interpolation=cv2.INTER_AREA) / 255.0
        x[i] = np.clip(im + rng.normal(0, 0.05, im.shape), 0, 1)
    xt = torch.from_numpy(x).unsqueeze(1).expand(-1, 3, -1, -1).contiguous()
    return LabelledImages(xt, torch.from_numpy(y.astype(np.int64)), [str(i) for i in range(10)], "rendered-digits")


def test_greace_at_beta_20_keeps_a_digit_classifier(tmp_path):
    train, val = rendered_digits(400, seed=0), rendered_digits(200, seed=1)
    m = train_defended("greace", "rendered", tmp_path / "g", epochs=8, batch_size=32, size=16, width=8, lr=3e-3,
                       options={"beta_max": 20.0}, augment=False, train_set=train, val_set=val,
                       log=lambda s: None)
    assert m["config"]["options"] == {"beta_max": 20.0} and m["final_beta"] > 15
    # chance is 10 %; measured 86.5 % with the default reading, 48.5 % (and falling) with --greace literal
    assert m["val_accuracy_pct"] > 75.0, [h["val_accuracy"] for h in m["history"]]


def test_cli_greace_choices_are_the_registered_readings():
    from models.cli_common import DEFENCE_OPTIONS
    from models.greace import DEFAULT_GREACE, GREACE_VARIANTS

    (row,) = [r for r in DEFENCE_OPTIONS if r[0] == "greace"]
    assert row[3] == DEFAULT_GREACE and tuple(row[4]) == tuple(GREACE_VARIANTS)
