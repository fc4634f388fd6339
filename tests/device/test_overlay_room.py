"""Room overlays draw what they say: fixed depth colours, normal colours, the layout's lines."""
import cv2
import numpy as np
import pytest

from device import overlay_room as ov
from shared import rooms

TURBO = cv2.applyColorMap(np.arange(256, dtype=np.uint8)[:, None], cv2.COLORMAP_TURBO)[:, 0]


def test_a_known_depth_gives_its_fixed_colour():
    depth = np.array([[0.2, 0.5, np.sqrt(0.5 * 10.0)], [10.0, 30.0, np.nan], [0.0, -1.0, np.inf]], np.float32)
    out = ov.depth_colours(depth)
    assert out.shape == (3, 3, 3) and out.dtype == np.uint8
    assert (out[0, 0] == TURBO[255]).all() and (out[0, 1] == TURBO[255]).all()  # near end (and nearer)
    assert (out[0, 2] == TURBO[128]).all()  # the log-scale middle: sqrt(near * far) = 2.24 m
    assert (out[1, 0] == TURBO[0]).all() and (out[1, 1] == TURBO[0]).all()  # far end (and farther)
    assert (out[1, 2] == 0).all() and (out[2] == 0).all()  # invalid -> black
    assert TURBO[255][2] > TURBO[255][0] and TURBO[0][0] > TURBO[0][2]  # near is red, far is blue
    # the scale is fixed: the same depth gets the same colour whatever else is in the frame
    assert (ov.depth_colours(np.full((2, 2), 3.0))[0, 0] == ov.depth_colours(np.array([[3.0, 9.0]]))[0, 0]).all()


def test_depth_view_resizes_and_blends():
    view = np.full((40, 60, 3), 100, np.uint8)
    depth = np.full((10, 15), 0.5, np.float32)
    full = ov.depth_view(view, depth)
    assert full.shape == (40, 60, 3) and (full == TURBO[255]).all()
    half = ov.depth_view(view, depth, alpha=0.5)
    assert np.abs(half.astype(int) - (0.5 * 100 + 0.5 * TURBO[255].astype(int))).max() <= 1


def test_normals_colours():
    n = np.array([[[0, 0, -1], [1, 0, 0]], [[0, -1, 0], [np.nan, 0, 0]]], np.float32)
    out = ov.normals_colours(n)  # BGR
    assert out[0, 0].tolist() == [255, 128, 128]  # facing the camera: RGB lavender (128, 128, 255)
    assert out[0, 1].tolist() == [128, 128, 255]  # facing right: red
    assert out[1, 0].tolist() == [128, 255, 128]  # facing up (y is down): green
    assert out[1, 1].tolist() == [0, 0, 0]
    # a model's normals need not be unit length: the view normalises them
    assert ov.normals_view(np.zeros((2, 2, 3), np.uint8), np.full((1, 1, 3), [0, 0, -3.0]))[1, 1].tolist() == [255, 128, 128]


def _yellow(px) -> bool:  # the line's colour, anti-aliased
    return px[0] < 30 and px[1] > 180 and px[2] > 180


def test_layout_draws_the_wireframe_from_keypoints_and_from_heatmaps():
    kp = np.zeros((rooms.NUM_KEYPOINTS, 3), np.float32)
    kp[0] = (10, 50, 2)  # floor corner FL
    kp[1] = (70, 50, 2)  # floor corner FR: the front floor edge runs between them
    view = np.zeros((64, 80, 3), np.uint8)
    out = ov.layout_view(view, kp, thickness=1)
    assert (view == 0).all()  # input untouched
    assert _yellow(out[50, 30]) and _yellow(out[50, 45])
    assert (out[10, 40] == 0).all() and (out[60, 40] == 0).all()  # nothing off the edge
    assert (out[50, 10] == ov.CORNER_COLOUR_BGR).all()
    # the same keypoints labelled on a 32x40 image land at the same place on the 64x80 view
    small = kp.copy()
    small[:, :2] = (kp[:, :2] + 0.5) / 2 - 0.5
    assert np.array_equal(ov.layout_view(view, small, size=(32, 40), thickness=1), out)
    # read from heatmaps (a model's output)
    hm = rooms.keypoint_heatmaps(kp, 64, 80)
    from_hm = ov.layout_view(view, heatmaps=hm, thickness=1)
    assert _yellow(from_hm[50, 40]) and (from_hm[10, 40] == 0).all()
    assert (ov.layout_view(view, heatmaps=hm * 0.1, thickness=1) == 0).all()  # under the threshold
    with pytest.raises(ValueError):
        ov.layout_view(view)


def test_overlays_of_a_rendered_room():
    fr = rooms.room_frame("office", 0, 1, (48, 64))
    view = cv2.cvtColor(fr.rgb, cv2.COLOR_RGB2BGR)
    d = ov.depth_view(view, fr.depth)
    assert len(np.unique(d.reshape(-1, 3), axis=0)) > 10  # a range of distances
    nv = ov.normals_view(view, fr.normals)
    wall = fr.surface == rooms.WALL_X0
    if wall.any():  # one plane, one normal, one colour
        assert len(np.unique(nv[wall], axis=0)) == 1
    lay = ov.layout_view(view, fr.keypoints)
    assert (lay != view).any() == bool(rooms.layout_segments(fr.keypoints) or (fr.keypoints[:8, 2] > 0).any())


def test_the_lut_colour_map_equals_opencvs_turbo_map_of_the_resized_index():
    """The depth view (index at model resolution, one uint8 resize, a 256-entry lookup) gives what
    OpenCV's own TURBO map gives on the same resized index, drawn alone or into a tile."""
    rng = np.random.default_rng(0)
    depth = np.exp(rng.uniform(np.log(0.3), np.log(15.0), (12, 16))).astype(np.float32)
    view = np.zeros((120, 160, 3), np.uint8)
    index = cv2.resize(ov.depth_index(depth).astype(np.uint8), (160, 120), interpolation=cv2.INTER_LINEAR)
    reference = cv2.applyColorMap(index, cv2.COLORMAP_TURBO).astype(int)
    assert np.abs(ov.depth_view(view, depth).astype(int) - reference).max() <= 1
    depth[3, 4] = np.nan  # invalid: black, the rest unchanged
    grid = np.full((240, 320, 3), 7, np.uint8)
    tile = ov.depth_view(view, depth, out=grid[120:, 160:])
    assert np.shares_memory(tile, grid) and np.array_equal(tile, ov.depth_view(view, depth))
    assert (grid[:120] == 7).all() and (grid[:, :160] == 7).all()  # nothing outside the tile
    idx = ov.depth_index(depth)
    index = cv2.resize(np.maximum(idx, 0).astype(np.uint8), (160, 120), interpolation=cv2.INTER_LINEAR)
    reference = cv2.applyColorMap(index, cv2.COLORMAP_TURBO).astype(int)
    black = cv2.resize((idx < 0).astype(np.uint8), (160, 120), interpolation=cv2.INTER_NEAREST) == 1
    assert black.sum() == 100 and (tile[black] == 0).all()  # the invalid cell: 10 x 10 pixels
    assert np.abs(tile[~black].astype(int) - reference[~black]).max() <= 1


def test_normals_in_one_transform_match_the_formula_within_one_level():
    rng = np.random.default_rng(1)
    n = rng.normal(size=(12, 16, 3)).astype(np.float32)
    n /= np.linalg.norm(n, axis=-1, keepdims=True)
    rgb = np.stack([(1 + n[..., 0]) / 2, (1 - n[..., 1]) / 2, (1 - n[..., 2]) / 2], axis=-1)
    expected = np.clip(rgb * 255 + 0.5, 0, 255).astype(np.uint8)[..., ::-1]
    assert np.abs(ov.normals_colours(n).astype(int) - expected).max() <= 1
