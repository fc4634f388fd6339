"""Rendered rooms: the labels are exact (geometry agrees with itself), typed, deterministic."""
import math

import cv2
import numpy as np
import pytest

from shared import rooms
from shared.errors import UserError

SIZE = (96, 128)


@pytest.fixture(scope="module")
def frames():
    """Two frames of each style, small."""
    return {(style, i): rooms.room_frame(style, 3, i, SIZE) for style in rooms.STYLES for i in (0, 5)}


def _backproject(depth: np.ndarray, f: float, cx: float, cy: float) -> np.ndarray:
    h, w = depth.shape
    v, u = np.mgrid[0:h, 0:w].astype(np.float64)
    z = depth.astype(np.float64)
    return np.stack([(u - cx) / f * z, (v - cy) / f * z, z], axis=-1)


def test_depth_is_positive_and_finite_and_normals_are_unit_and_face_the_camera(frames):
    for fr in frames.values():
        assert fr.rgb.shape == SIZE + (3,) and fr.rgb.dtype == np.uint8
        assert fr.depth.dtype == np.float32 and np.isfinite(fr.depth).all() and fr.depth.min() > 0.05
        assert fr.depth.max() < 15.0  # inside a room of at most 7 x 8 x 3.1 m
        assert np.allclose(np.linalg.norm(fr.normals, axis=-1), 1.0, atol=1e-5)
        f, cx, cy = fr.intrinsics
        v, u = np.mgrid[0:SIZE[0], 0:SIZE[1]]
        rays = np.stack([(u - cx) / f, (v - cy) / f, np.ones(SIZE)], axis=-1)
        assert ((fr.normals * rays).sum(-1) < 0).all()  # every surface seen from its front
        assert fr.rgb.std() > 5  # not a blank image


def test_normals_from_the_depth_gradient_agree_with_the_rendered_normals_on_planes(frames):
    for fr in frames.values():
        pts = _backproject(fr.depth, *fr.intrinsics)
        du = pts[:-1, 1:] - pts[:-1, :-1]
        dv = pts[1:, :-1] - pts[:-1, :-1]
        n = np.cross(du, dv)
        n /= np.linalg.norm(n, axis=-1, keepdims=True)
        s = fr.surface
        same = (s[:-1, :-1] == s[:-1, 1:]) & (s[:-1, :-1] == s[1:, :-1])  # three pixels on one plane
        rendered = fr.normals[:-1, :-1]
        cos = np.abs((n * rendered).sum(-1))[same]
        assert same.mean() > 0.9
        angle = np.degrees(np.arccos(np.clip(cos, -1, 1)))
        assert np.percentile(angle, 99) < 1.0, np.percentile(angle, 99)


def _neighbourhood(surface: np.ndarray, u: float, v: float, r: int = 2) -> set[int]:
    h, w = surface.shape
    c, row = int(round(u)), int(round(v))
    return set(np.unique(surface[max(row - r, 0):min(row + r + 1, h), max(c - r, 0):min(c + r + 1, w)]).tolist())


def _corner_planes(room: rooms.Room, cam: rooms.Camera, channel: int) -> set[int]:
    x, z = rooms._view_corners(room, cam)[channel % 4]
    return rooms._walls_at(x, z) | {rooms.FLOOR if channel < 4 else rooms.CEILING}


def test_keypoints_sit_where_the_rendered_walls_floor_and_ceiling_meet():
    checked_corners = checked_ends = checked_hidden = 0
    for style in rooms.STYLES:
        room = rooms.make_room(style, 11, 0)
        for t in np.linspace(0, 40, 10):
            cam = rooms.walk_camera(room, float(t))
            fr = rooms.render(room, cam, SIZE)
            for ch in range(8):
                u, v, state = fr.keypoints[ch]
                if state == 1:  # hidden: furniture in front of the corner
                    assert fr.surface[min(int(round(v)), SIZE[0] - 1), min(int(round(u)), SIZE[1] - 1)] >= rooms.FIRST_FURNITURE
                    checked_hidden += 1
                if state != 2 or not (2 <= u <= SIZE[1] - 3 and 2 <= v <= SIZE[0] - 3):
                    continue  # (at the very border a plane may lie just outside the image)
                planes = _corner_planes(room, cam, ch)
                assert planes <= _neighbourhood(fr.surface, u, v), (style, t, rooms.KEYPOINT_NAMES[ch])
                assert abs(fr.depth[int(round(v)), int(round(u))] - fr.corners_camera[ch, 2]) < 0.06 * fr.corners_camera[ch, 2]
                checked_corners += 1
            h, w = SIZE
            for ch in range(8, rooms.NUM_KEYPOINTS):  # border ends lie on the border
                u, v, state = fr.keypoints[ch]
                if state > 0:
                    assert min(abs(u + 0.5), abs(u - (w - 0.5)), abs(v + 0.5), abs(v - (h - 0.5))) < 1e-3
            edges = {e[0]: e for e in rooms.LAYOUT_EDGES}
            for name, a, b in rooms.layout_segments(fr.keypoints):  # and the edges run between the planes
                _, ca, cb, _, _ = edges[name]
                planes = _corner_planes(room, cam, ca) & _corner_planes(room, cam, cb)
                for frac in (0.25, 0.5, 0.75):
                    u, v = a[0] + frac * (b[0] - a[0]), a[1] + frac * (b[1] - a[1])
                    if not (3 <= u <= w - 4 and 3 <= v <= h - 4):
                        continue  # a plane may lie just outside the image
                    near = _neighbourhood(fr.surface, u, v)
                    if max(near) >= rooms.FIRST_FURNITURE:
                        continue  # behind furniture here
                    assert planes <= near, (style, t, name, frac)
                    checked_ends += 1
    assert checked_corners >= 10 and checked_ends >= 20 and checked_hidden >= 1


def test_corner_types_follow_the_view_and_the_image_is_not_mirrored():
    room = rooms.make_room("bare", 0, 0)
    w, h, d = room.size
    cam = rooms.Camera.looking((w / 2, 1.6, 0.3), 0.0, 0.0, 0.0, 100.0)  # looking along +z
    rot = cam.rotation
    assert np.allclose(rot.T @ rot, np.eye(3)) and np.isclose(np.linalg.det(rot), 1.0)
    corners = rooms._view_corners(room, cam)
    # looking along +z with y up, the camera's right is -x: the front-left corner is (W, D)
    assert corners.tolist() == [[w, d], [0.0, d], [0.0, 0.0], [w, 0.0]]
    fr = rooms.render(room, cam, (120, 160))
    fl, fr_ = fr.keypoints[4], fr.keypoints[5]  # ceiling corners ahead, both in view
    assert fl[2] > 0 and fr_[2] > 0 and fl[0] < 80 < fr_[0] and fl[1] < 60 and fr.keypoints[0][1] > 60
    assert fr.surface[60, 2] == rooms.WALL_X1 and fr.surface[60, 157] == rooms.WALL_X0
    # pitch up shows more ceiling than pitch down
    centre = (w / 2, 1.6, d / 2)
    up = rooms.render(room, rooms.Camera.looking(centre, 0.0, 0.3, 0.0, 70.0), (60, 80)).surface
    down = rooms.render(room, rooms.Camera.looking(centre, 0.0, -0.3, 0.0, 70.0), (60, 80)).surface
    assert (up == rooms.CEILING).mean() > (down == rooms.CEILING).mean() + 0.2
    assert (down == rooms.FLOOR).mean() > (up == rooms.FLOOR).mean() + 0.03


def test_heatmaps_are_gaussians_at_the_keypoints_and_read_back(frames):
    compared = 0
    for fr in frames.values():
        assert fr.heatmaps.shape == (rooms.NUM_KEYPOINTS, SIZE[0] // 4, SIZE[1] // 4)
        present = fr.keypoints[:, 2] > 0
        assert np.all(fr.heatmaps[~present] == 0) and np.all(fr.heatmaps[present].max(axis=(1, 2)) > 0.3)
        back = rooms.heatmap_keypoints(fr.heatmaps, *SIZE)
        assert np.array_equal(back[:, 2] > 0, present)
        inner = present & (fr.keypoints[:, 0] > 4) & (fr.keypoints[:, 0] < SIZE[1] - 5) \
            & (fr.keypoints[:, 1] > 4) & (fr.keypoints[:, 1] < SIZE[0] - 5)
        if inner.any():
            assert np.abs(back[inner, :2] - fr.keypoints[inner, :2]).max() < 0.05
            compared += int(inner.sum())
    assert compared >= 3
    kp = np.zeros((rooms.NUM_KEYPOINTS, 3), np.float32)
    kp[3] = (41.5, 17.5, 2)  # the centre of output pixel (10, 4) at stride 4
    hm = rooms.keypoint_heatmaps(kp, 64, 64)
    assert hm[3, 4, 10] == pytest.approx(1.0) and hm[3, 4, 11] == pytest.approx(math.exp(-1 / (2 * 1.5 ** 2)))
    assert len(rooms.KEYPOINT_NAMES) == 32 and len(set(rooms.KEYPOINT_NAMES)) == 32


def test_layout_segments_draw_every_edge_the_image_shows():
    room = rooms.make_room("bare", 2, 0)
    drawn = 0
    for t in np.linspace(0, 30, 7):
        cam = rooms.walk_camera(room, float(t))
        fr = rooms.render(room, cam, SIZE)
        names = {seg[0] for seg in rooms.layout_segments(fr.keypoints)}
        s = fr.surface
        pairs = set()
        for a, b in ((s[:, :-1], s[:, 1:]), (s[:-1], s[1:])):
            touching = a != b
            pairs |= {frozenset(p) for p in np.unique(np.stack([a[touching], b[touching]], 1), axis=0).tolist()}
        for name, ca, cb, _, _ in rooms.LAYOUT_EDGES:
            planes = frozenset(_corner_planes(room, cam, ca) & _corner_planes(room, cam, cb))
            if planes in pairs:  # the two planes meet in the image: the wireframe has that edge
                assert name in names, (t, name)
                drawn += 1
    assert drawn >= 10


def test_frames_are_deterministic_by_seed_and_index_and_splits_differ():
    a = rooms.room_frame("mixed", 7, 3, (48, 64))
    b = rooms.room_frame("mixed", 7, 3, (48, 64))
    assert a.rgb.tobytes() == b.rgb.tobytes() and np.array_equal(a.depth, b.depth)
    assert not np.array_equal(rooms.room_frame("mixed", 8, 3, (48, 64)).depth, a.depth)
    assert not np.array_equal(rooms.room_frame("mixed", 7, 3, (48, 64), split="val").depth, a.depth)
    many = rooms.room_frames(3, "office", 1, (48, 64))
    few = rooms.room_frames(2, "office", 1, (48, 64))
    assert np.array_equal(many.rgb[:2], few.rgb) and np.array_equal(many.heatmaps[:2], few.heatmaps)
    assert many.rgb.shape == (3, 48, 64, 3) and many.depth.shape == (3, 48, 64)
    assert many.normals.shape == (3, 48, 64, 3) and many.keypoints.shape == (3, 32, 3)
    assert many.heatmaps.shape == (3, 32, 12, 16) and many.heatmaps.dtype == np.float32


def test_the_walk_is_smooth_at_head_height():
    room = rooms.make_room("living", 4, 0)
    cams = [rooms.walk_camera(room, i / 30.0) for i in range(90)]
    pos = np.array([c.position for c in cams])
    assert np.linalg.norm(np.diff(pos, axis=0), axis=1).max() < 0.05  # < 1.5 m/s
    fwd = np.array([c.rotation[:, 2] for c in cams])
    assert np.degrees(np.arccos(np.clip((fwd[1:] * fwd[:-1]).sum(1), -1, 1))).max() < 3.0
    assert 1.4 < pos[:, 1].min() and pos[:, 1].max() < 1.8
    w, _, d = room.size
    assert (pos[:, 0] > 0.3).all() and (pos[:, 0] < w - 0.3).all() and (pos[:, 2] > 0.3).all()
    for bx in room.boxes:  # never inside furniture
        inside = ((pos[:, 0] > bx.lo[0]) & (pos[:, 0] < bx.hi[0]) & (pos[:, 2] > bx.lo[2]) & (pos[:, 2] < bx.hi[2]))
        assert not inside.any()


def test_photo_textures_from_a_folder(tmp_path):
    rng = np.random.default_rng(0)
    cv2.imwrite(str(tmp_path / "brick.png"), rng.integers(0, 255, size=(50, 60, 3), dtype=np.uint8))
    fr = rooms.render(room := rooms.make_room("bare", 0, 0, texture_dir=str(tmp_path)),
                      rooms.walk_camera(room, 1.0), (48, 64))
    assert any(m.texture.startswith("photo:") for m in room.materials) and fr.rgb.std() > 5
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="no readable images"):
        rooms.make_room("bare", 0, 0, texture_dir=str(empty))


@pytest.mark.parametrize("call, message", [
    (lambda: rooms.room_frames(1, "office"), "N must be at least 2"),
    (lambda: rooms.room_frames(4, "castle"), "unknown room style 'castle'"),
    (lambda: rooms.room_frames(4, "office", size=50), "multiples of 4"),
    (lambda: rooms.room_frames(4, "office", split="dev"), "unknown split 'dev'"),
])
def test_bad_input_is_one_clear_line(call, message):
    with pytest.raises(UserError, match=message) as err:
        call()
    assert "\n" not in str(err.value)


def test_a_ray_parallel_to_a_plane_still_meets_the_room_in_front():
    # an odd-sized view looking straight along an axis: the middle row's rays have a y component of
    # exactly 0 (parallel to the floor and ceiling); their depth was -1.6e9 before the fix
    room = rooms.make_room("bare", 0, 0)
    width, _, depth = room.size
    cam = rooms.Camera.looking((width / 2, 1.6, depth / 2), 0.0, 0.0, 0.0, 66.0)
    frame = rooms.render(room, cam, (61, 81))
    assert np.isfinite(frame.depth).all() and frame.depth.min() > 0.3
    assert frame.depth.max() < np.hypot(width, depth)
