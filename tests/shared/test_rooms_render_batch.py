"""Batched rendering (one numpy pass over several frames of a room) equals rendering one frame at a time."""
import cv2
import numpy as np
import pytest

from shared import rooms

SIZE = (32, 48)
FIELDS = ("rgb", "depth", "normals", "surface", "keypoints", "heatmaps", "corners_camera")


def _assert_same_frame(a: rooms.RoomFrame, b: rooms.RoomFrame) -> None:
    for name in FIELDS:
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and x.shape == y.shape, name
        assert np.array_equal(x, y), f"{name}: max difference {np.abs(x.astype(np.float64) - y).max()}"
    assert a.intrinsics == b.intrinsics


def test_room_frames_batched_per_room_equal_room_frame_one_at_a_time():
    n = rooms.FRAMES_PER_ROOM + 2  # a whole room's batch and part of the next one's
    got = rooms.room_frames(n, "mixed", seed=4, size=SIZE)
    for i in range(n):
        one = rooms.room_frame("mixed", 4, i, SIZE)
        for name in ("rgb", "depth", "normals", "keypoints", "heatmaps"):
            assert np.array_equal(getattr(got, name)[i], getattr(one, name)), (i, name)


@pytest.mark.parametrize("size", [SIZE, (240, 320)])  # at 240x320 a strided exposure sum once differed
def test_render_batch_equals_render_of_each_camera_with_furniture_in_view_and_noise_or_none(size):
    room = rooms.make_room("office", 8, 0)
    cams = [rooms.walk_camera(room, t) for t in (0.5, 4.0, 9.5)]
    seeds = [1, None, 7]
    batch = rooms.render_batch(room, cams, size, seeds)
    assert len(batch) == len(cams)
    assert any((fr.surface >= rooms.FIRST_FURNITURE).any() for fr in batch)  # the box slab test ran
    for cam, seed, fr in zip(cams, seeds, batch):
        _assert_same_frame(fr, rooms.render(room, cam, size, noise_seed=seed))


def test_render_batch_needs_one_field_of_view_and_a_seed_per_camera():
    room = rooms.make_room("bare", 0, 0)
    cam = rooms.walk_camera(room, 0.0)
    wide = rooms.Camera(cam.position, cam.rotation, cam.hfov_deg + 10)
    with pytest.raises(ValueError, match="same field of view"):
        rooms.render_batch(room, [cam, wide], SIZE)
    with pytest.raises(ValueError, match="noise seeds"):
        rooms.render_batch(room, [cam, cam], SIZE, [1])


def test_texels_are_coloured_exactly_as_cv2_multiply_colours_a_texture():
    """The per-material colour LUT reproduces the coloured atlas the renderer used to bake per room."""
    room = rooms.make_room("living", 1, 0)
    lut = room.material_table["colour_lut"].reshape(len(room.materials), 3, 256)
    ramp = np.repeat(np.arange(256, dtype=np.uint8)[None, :, None], 3, axis=2)
    for k, m in enumerate(room.materials):
        colour = [c / max(max(m.colour), 1.0) for c in m.colour]
        baked = cv2.multiply(ramp, (*colour, 0.0))[0].T.astype(np.float32) * np.float32(1 / 100.0)
        assert np.array_equal(lut[k], baked), m
