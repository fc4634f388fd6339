import numpy as np
import pytest

from device import overlay
from device.engine import load_model


@pytest.fixture
def frame_and_pred(toy):
    engine = load_model(toy("a", size=32))
    frame = np.full((48, 64, 3), 64, np.uint8)
    return frame, engine.predict(frame)


def test_colour_mode_shows_the_colourised_view(frame_and_pred):
    frame, pred = frame_and_pred
    out = overlay.render(frame, pred, "colour")
    assert out.shape == (48, 64, 3) and out.dtype == np.uint8
    # toy colour = RGB (x, 1 - x, 0.5) for x = 64/255; the output is BGR
    assert tuple(out[30, 30]) == (128, 191, 64)
    assert tuple(frame[0, 0]) == (64, 64, 64)  # the camera frame is never modified


def test_edges_are_blended_over_the_view_by_strength(frame_and_pred):
    frame, pred = frame_and_pred
    out = overlay.render(frame, pred, "edges").astype(int)
    a = 64 / 255  # toy edges = x
    expected = np.array([64 * (1 - a), 64 * (1 - a) + 255 * a, 64 * (1 - a)])
    assert np.abs(out[30, 30] - expected).max() <= 1


def test_denoised_and_side_by_side(frame_and_pred):
    frame, pred = frame_and_pred
    assert tuple(overlay.render(frame, pred, "denoised")[20, 20]) == (191, 191, 191)
    grid = overlay.render(frame, pred, "side-by-side")
    assert grid.shape == frame.shape
    assert tuple(grid[5, 5]) == (64, 64, 64)  # top left: the view
    assert tuple(grid[30, 5]) == (128, 191, 64)  # bottom left: colour
    assert tuple(grid[30, 40]) == (191, 191, 191)  # bottom right: denoised
    assert grid[5, 40, 1] > grid[5, 40, 0]  # top right: green edges


def test_class_mode_draws_label_and_confidence_bar(frame_and_pred):
    frame, pred = frame_and_pred
    out = overlay.render(frame, pred, "class")
    bar_rows = out[44:]
    assert (bar_rows != 64).any() and (out[:30] == 64).all()  # only the bottom band is drawn on
    # the bar length follows the confidence: orange pixels (B=0, G=200, R=255) up to conf * width
    orange = np.all(out[48 - 14:48 - 12] == (0, 200, 255), axis=2)
    assert orange.all(axis=0).sum() == round(64 * pred.confidence) > 0
    assert orange[:, :round(64 * pred.confidence)].all()


def test_hud_darkens_the_top_band_and_writes_text(frame_and_pred):
    frame, pred = frame_and_pred
    out = overlay.render(frame, pred, "denoised")
    overlay.draw_hud(out, overlay.HudInfo(29.5, 12.0, 20.0, "v7", "denoised"))
    band = out[:overlay.HUD_HEIGHT]
    assert (band == 191 >> 2).mean() > 0.5  # darkened
    assert (band > 150).any()  # white text
    assert (out[overlay.HUD_HEIGHT:] == 191).all()


def test_no_prediction_shows_the_plain_view():
    frame = np.zeros((10, 10, 3), np.uint8)
    frame[..., 0] = 200  # red in RGB
    out = overlay.render(frame, None, "colour")
    assert tuple(out[0, 0]) == (0, 0, 200)  # BGR


def test_hud_percentiles_follow_the_recent_latencies_every_ten_frames():
    from device.metrics import StageTimer

    timer = StageTimer(recent=20)
    for _ in range(20):
        timer.add("total", 10.0)
    assert timer.recent_p50_p95() == (10.0, 10.0)
    for _ in range(9):
        timer.add("total", 30.0)
    assert timer.recent_p50_p95() == (10.0, 10.0)  # cached: 9 new samples
    timer.add("total", 30.0)
    p50, p95 = timer.recent_p50_p95()  # 10 x 10 ms and 10 x 30 ms in the window
    assert p50 == 20.0 and p95 == 30.0
