"""The headset shows the room: a room model's prediction drawn in its modes, the mode picked by the
model's task set, and the shipped room model running on the rooms source."""
import json

import cv2
import numpy as np

from device import overlay
from device import overlay_room as ov
from device.engine import Prediction
from hmd.cli import main
from shared.rooms import NUM_KEYPOINTS

TURBO = cv2.applyColorMap(np.arange(256, dtype=np.uint8)[:, None], cv2.COLORMAP_TURBO)[:, 0]


def room_prediction(depth_m: float, h: int = 8, w: int = 10) -> Prediction:
    normals = np.zeros((h, w, 3), np.float32)
    normals[..., 2] = -1.0  # every surface faces the camera
    return Prediction(-1, 0.0, "-", None, None, None, "room-test", depth=np.full((h, w), depth_m, np.float32),
                      normals=normals, keypoints=np.zeros((NUM_KEYPOINTS, h, w), np.float32), task_set="room")


def test_a_known_depth_gives_the_expected_colour_in_the_depth_mode():
    frame = np.full((40, 60, 3), 90, np.uint8)
    near = overlay.render(frame, room_prediction(ov.DEPTH_NEAR_M), "depth")
    far = overlay.render(frame, room_prediction(ov.DEPTH_FAR_M), "depth")
    assert near.shape == (40, 60, 3) and (near == TURBO[255]).all() and (far == TURBO[0]).all()
    mid = overlay.render(frame, room_prediction(float(np.sqrt(ov.DEPTH_NEAR_M * ov.DEPTH_FAR_M))), "depth")
    assert (mid == TURBO[128]).all()  # the log scale's middle


def test_normals_mode_colours_and_layout_mode_draws_nothing_without_keypoints():
    frame = np.full((40, 60, 3), 90, np.uint8)
    assert (overlay.render(frame, room_prediction(2.0), "normals") == [255, 128, 128]).all()  # lavender, BGR
    assert (overlay.render(frame, room_prediction(2.0), "layout") == 90).all()  # no heatmap peak: the view


def test_the_hud_names_the_room_mode():
    hud = overlay.HudInfo(30.0, 10.0, 12.0, "room-v1", overlay.mode_for("edges", "room"))
    img = np.zeros((240, 320, 3), np.uint8)
    assert overlay._model_field(hud, 320, overlay.text_style(240)).endswith("[depth]")
    assert overlay.with_hud(img, hud).shape[0] == 240 + overlay.hud_height(320, 240)


def test_the_model_task_set_picks_the_modes():
    assert overlay.mode_for("edges", "room") == "depth" and overlay.mode_for("normals", "room") == "normals"
    assert overlay.mode_for("depth", "cifar") == "edges" and overlay.mode_for("side-by-side", "room") == "side-by-side"
    assert overlay.mode_key(ord("3"), "room") == "layout" and overlay.mode_key(ord("5"), "room") is None
    frame = np.full((240, 320, 3), 90, np.uint8)
    # a cifar mode asked of a room model draws the room's first mode (depth), never a blank view
    assert (overlay.render(frame, room_prediction(ov.DEPTH_NEAR_M), "edges") == TURBO[255]).all()
    grid = overlay.render(frame, room_prediction(ov.DEPTH_NEAR_M), "side-by-side")
    assert (grid[150:235, 5:155] == [255, 128, 128]).all()  # bottom-left tile (below its label): normals
    assert (grid[30:115, 170:315] == TURBO[255]).all()  # top-right tile: depth


def test_the_shipped_room_model_runs_on_the_rooms_source_and_the_hud_names_the_mode(tmp_path, capsys):
    metrics, snapshot = tmp_path / "m.json", tmp_path / "last.png"
    assert main(["device", "--model", "room", "--source", "rooms:bare", "--headless", "--fps", "0",
                 "--max-frames", "3", "--metrics", str(metrics), "--snapshot", str(snapshot)]) == 0
    summary = json.loads(metrics.read_text())
    assert summary["frames_shown"] == 3 and summary["inference_errors"] == 0 and summary["mode"] == "depth"
    assert "depth view" in capsys.readouterr().err  # the start line: a room model starts in depth
    shown = cv2.imread(str(snapshot))
    band = overlay.hud_height(320, 240)
    assert shown.shape == (band + 240, 320, 3)
    assert np.isin(shown[band:].reshape(-1, 3), TURBO).all(axis=1).mean() > 0.95  # the view is a depth map


def test_side_by_side_tiles_are_the_single_views_at_tile_size():
    """Each tile is drawn straight into its quarter of the grid: the same pixels as the mode drawn
    alone on the shrunk view (outside the label boxes)."""
    rng = np.random.default_rng(0)
    pred = room_prediction(2.0, 12, 16)
    pred.depth[:] = rng.uniform(0.4, 12.0, (12, 16))
    pred.normals[:] = rng.normal(size=(12, 16, 3))
    pred.keypoints[0, 9, 3] = pred.keypoints[1, 9, 12] = 1.0  # two floor corners: one wireframe edge
    frame = rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)
    grid = overlay.render(frame, pred, "side-by-side")
    small = cv2.resize(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR), (160, 120), interpolation=cv2.INTER_AREA)
    below = overlay.label_box("normals", overlay.text_style(240))[1]  # rows under the labels
    for mode, (r, c) in zip(overlay.ROOM_MODES[:3], [(0, 1), (1, 0), (1, 1)]):
        alone = overlay.RENDERERS[mode](small, pred)
        assert np.array_equal(grid[r * 120 + below:(r + 1) * 120, c * 160:(c + 1) * 160], alone[below:]), mode
    assert (grid[120 + below:, 160:] != small[below:]).any()  # the layout tile has its line
