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
    # each tile's bottom-right corner, away from its label
    assert tuple(grid[22, 30]) == (64, 64, 64)  # top left: the view
    assert tuple(grid[46, 30]) == (128, 191, 64)  # bottom left: colour
    assert tuple(grid[46, 62]) == (191, 191, 191)  # bottom right: denoised
    assert grid[22, 62, 1] > grid[22, 62, 0]  # top right: green edges


def _label_pixels(tile: np.ndarray, label: str, style) -> tuple[np.ndarray, np.ndarray]:
    bw, bh = overlay.label_box(label, style)
    return tile[:bh, :bw], tile[bh:]


@pytest.mark.parametrize("size", [(240, 320), (720, 1280)])
def test_side_by_side_tiles_are_labelled(toy, size):
    """Every tile carries its label in its top-left corner: a darkened box with white text; the
    rest of the tile is the tile's content, untouched."""
    h, w = size
    engine = load_model(toy("a", size=32))
    frame = np.full((h, w, 3), 64, np.uint8)
    pred = engine.predict(frame)
    grid = overlay.render(frame, pred, "side-by-side")
    style = overlay.text_style(h)
    plain = {"camera": 64, "colour": None, "denoised": 191}
    spans = []
    for k, label in enumerate(overlay.TILE_LABELS):
        r, c = divmod(k, 2)
        tile = grid[r * (h // 2):(r + 1) * (h // 2), c * (w // 2):(c + 1) * (w // 2)]
        box, below = _label_pixels(tile, label, style)
        assert (box > 200).all(axis=2).sum() >= 10 * len(label), label  # white text strokes
        if plain.get(label) is not None:
            assert (box == plain[label] >> 2).all(axis=2).mean() > 0.4, label  # darkened around the text
            assert (below == plain[label]).all(), label
        text_rows = np.flatnonzero((box > 200).all(axis=2).any(axis=1))
        spans.append(text_rows.max() - text_rows.min() + 1)
    # legible: letters with ascenders ("edges", "colour", "denoised") are 10+ px tall at 320x240,
    # 20+ at 1280x720
    assert max(spans) >= {240: 10, 720: 20}[h], spans


def test_class_mode_draws_label_and_confidence_bar(frame_and_pred):
    frame, pred = frame_and_pred
    out = overlay.render(frame, pred, "class")
    bar_rows = out[44:]
    assert (bar_rows != 64).any() and (out[:30] == 64).all()  # only the bottom band is drawn on
    # the bar length follows the confidence: orange pixels (B=0, G=200, R=255) up to conf * width
    orange = np.all(out[48 - 14:48 - 12] == (0, 200, 255), axis=2)
    assert orange.all(axis=0).sum() == round(64 * pred.confidence) > 0
    assert orange[:, :round(64 * pred.confidence)].all()


def _text_rows_and_cols(band: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    bright = (band > 150).all(axis=2)
    return np.flatnonzero(bright.any(axis=1)), np.flatnonzero(bright.any(axis=0))


@pytest.mark.parametrize("size", [(240, 320), (720, 1280), (48, 64)])
def test_the_hud_is_a_band_above_the_view_and_hides_nothing(size):
    h, w = size
    view = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
    out = overlay.with_hud(view, overlay.HudInfo(29.5, 12.0, 20.0, "v7", "denoised"))
    band = overlay.hud_height(w, h)
    assert out.shape == (h + band, w, 3) and (h + band) % 2 == 0  # even: an MP4 keeps every row
    assert (out[band:] == view).all()  # the whole view, untouched, below the band
    rows, cols = _text_rows_and_cols(out[:band])
    assert rows.size and cols.size  # white text in the band
    # legible at every size: text at least ~9 px tall at 320x240, growing with the frame
    assert rows.max() - rows.min() >= 0.8 * overlay.text_style(h).height >= 0.8 * 14
    # the band is the same height whatever it says (a recording keeps one frame size)
    other = overlay.with_hud(view, overlay.HudInfo(999.9, 9999, 9999, "x" * 80, "side-by-side", "NO MODEL OUTPUT"))
    assert other.shape == out.shape


@pytest.mark.parametrize("size", [(240, 320), (720, 1280)])
def test_a_long_version_name_is_elided_not_cut(size):
    h, w = size
    version = "personal-headset-1-20261201-job-0f3a9c-int8-v0007" * 2
    out = overlay.with_hud(np.zeros((h, w, 3), np.uint8), overlay.HudInfo(9.5, 112, 230, version, "class"))
    style = overlay.text_style(h)
    _, cols = _text_rows_and_cols(out[:overlay.hud_height(w, h)])
    assert cols.max() < w - style.pad // 2  # nothing runs off the right edge
    field = overlay._model_field(overlay.HudInfo(9.5, 112, 230, version, "class"), w - 2 * style.pad, style)
    assert "..." in field and field.startswith("model pers") and field.endswith("v0007  [class]")
    assert style.width(field) <= w - 2 * style.pad


def test_elide_keeps_the_start_and_the_end():
    style = overlay.text_style(240)
    assert overlay.elide("short", 200, style) == "short"
    long = "abcdefghijklmnopqrstuvwxyz0123456789"
    cut = overlay.elide(long, style.width(long) // 2, style)
    assert cut.startswith("abc") and cut.endswith("789") and "..." in cut
    assert style.width(cut) <= style.width(long) // 2


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


def test_the_hud_band_is_drawn_once_per_distinct_hud_and_never_shared():
    view = np.zeros((240, 320, 3), np.uint8)
    hud = overlay.HudInfo(29.5, 12.0, 20.0, "v7", "denoised")
    first = overlay.with_hud(view, hud)
    first[:5] = 255  # the caller's copy: the cached band is not touched
    again = overlay.with_hud(view, overlay.HudInfo(29.5, 12.0, 20.0, "v7", "denoised"))
    assert not (again[:5] == 255).all() and np.array_equal(again[5:], first[5:])
    band = overlay.hud_height(320, 240)
    assert not np.array_equal(overlay.with_hud(view, overlay.HudInfo(31.0, 12.0, 20.0, "v7", "denoised"))[:band],
                              again[:band])  # other figures: another band


def test_the_runtime_refreshes_the_hud_figures_every_ten_frames(toy):
    from device.capture import ArraySource
    from device.runtime import HUD_REFRESH_FRAMES, HeadsetRuntime, RuntimeConfig
    from tests.device.conftest import gray_frames

    bands = []
    band = overlay.hud_height(64, 48)
    rt = HeadsetRuntime(ArraySource(gray_frames([90] * 25)), toy("v1"), RuntimeConfig(headless=True, lockstep=True),
                        on_frame=lambda i, shown, pred: bands.append(shown[:band].copy()))
    rt.run()
    changes = [i for i in range(1, 25) if not np.array_equal(bands[i], bands[i - 1])]
    assert HUD_REFRESH_FRAMES == 10 and set(changes) <= {10, 20} and changes  # the FPS moved, at refreshes only
