import threading
import time

import cv2
import numpy as np
import pytest

from device.capture import (ArraySource, CaptureThread, FrameSource, ImageFolderSource, RoomsSource, SourceEnded,
                            SyntheticSource, VideoSource, WebcamSource, open_source)
from shared.errors import UserError


def test_synthetic_source_moves_like_a_head_and_keeps_its_size():
    src = SyntheticSource("forest", size=(48, 64), fps=30)
    frames = [src.read() for _ in range(6)]
    assert all(f.shape == (48, 64, 3) and f.dtype == np.uint8 for f in frames)
    diffs = [float(np.abs(a.astype(int) - b.astype(int)).mean()) for a, b in zip(frames, frames[1:])]
    assert all(d > 0.5 for d in diffs)  # the view pans: consecutive frames differ
    assert SyntheticSource("forest", size=(48, 64)).read().tobytes() == frames[0].tobytes()  # deterministic
    assert open_source("synthetic:neon", size=(32, 32)).name == "synthetic:neon"
    with pytest.raises(UserError, match="unknown synthetic world"):
        open_source("synthetic:moon")


def test_rooms_source_walks_through_a_room_deterministically():
    src = open_source("rooms:office", size=(60, 80))
    assert isinstance(src, RoomsSource) and src.name == "rooms:office" and src.fps == 30.0
    frames = [src.read() for _ in range(4)]
    assert all(f.shape == (60, 80, 3) and f.dtype == np.uint8 for f in frames)
    diffs = [float(np.abs(a.astype(int) - b.astype(int)).mean()) for a, b in zip(frames, frames[1:])]
    assert all(0.2 < d < 40 for d in diffs)  # the wearer moves, smoothly
    assert RoomsSource("office", size=(60, 80)).read().tobytes() == frames[0].tobytes()
    assert open_source("rooms", size=(60, 80)).name == "rooms:living"
    with pytest.raises(UserError, match="unknown room style 'attic'"):
        open_source("rooms:attic")


class CountingSource(FrameSource):
    """Frames carry their own number in pixel [0, 0]; unpaced unless fps is set."""

    def __init__(self, n, fps=0.0):
        self.n, self.i, self.fps = n, 0, fps

    def read(self):
        if self.i >= self.n:
            raise SourceEnded("done")
        img = np.zeros((8, 8, 3), np.uint8)
        img[0, 0, 0] = self.i % 256
        self.i += 1
        return img


def test_capture_keeps_only_the_newest_frame_and_counts_the_drops():
    cap = CaptureThread(CountingSource(60, fps=400)).start()
    taken = []
    while True:
        frame = cap.get(timeout=2)
        if frame is None:
            break
        taken.append(frame.index)
        time.sleep(0.012)  # a loop slower than the camera
    assert cap.ended and cap.end_reason == "done"
    assert taken == sorted(taken) and len(set(taken)) == len(taken)  # never a stale or repeated frame
    assert cap.captured == 60
    assert cap.dropped > 0
    assert len(taken) + cap.dropped == 60  # every frame is shown or counted as dropped
    assert cap.dropped == sum(b - a - 1 for a, b in zip([-1] + taken, taken)) + (59 - taken[-1])


def test_lockstep_capture_drops_nothing():
    cap = CaptureThread(CountingSource(30), lockstep=True).start()
    taken = []
    while (frame := cap.get(timeout=2)) is not None:
        taken.append(int(frame.image[0, 0, 0]))
        time.sleep(0.002)
    assert taken == list(range(30)) and cap.dropped == 0


def test_video_source_reads_all_frames_and_loops(tmp_path):
    path = tmp_path / "v.mp4"
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 25, (64, 48))
    for v in range(0, 250, 25):
        w.write(np.full((48, 64, 3), v, np.uint8))
    w.release()
    src = VideoSource(path)
    assert src.fps == pytest.approx(25)
    frames = []
    with pytest.raises(SourceEnded):
        while True:
            frames.append(src.read())
    assert len(frames) == 10 and abs(int(frames[3].mean()) - 75) <= 3
    looped = VideoSource(path, loop=True)
    assert len([looped.read() for _ in range(25)]) == 25


def test_unreadable_video_and_missing_folders_are_user_errors(tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video at all" * 100)
    with pytest.raises(UserError, match="cannot read video"):
        VideoSource(bad)
    with pytest.raises(UserError, match="not found"):
        open_source(f"video:{tmp_path / 'none.mp4'}")
    with pytest.raises(UserError, match="no images"):
        ImageFolderSource(tmp_path)
    with pytest.raises(UserError, match="unknown source"):
        open_source("camera:0")


def test_image_folder_source_skips_unreadable_files(tmp_path):
    cv2.imwrite(str(tmp_path / "a.png"), np.full((10, 12, 3), 30, np.uint8))
    (tmp_path / "b.png").write_bytes(b"broken")
    cv2.imwrite(str(tmp_path / "c.png"), np.full((10, 12, 3), 90, np.uint8))
    src = ImageFolderSource(tmp_path, loop=False)
    assert [int(src.read().mean()), int(src.read().mean())] == [30, 90]
    with pytest.raises(SourceEnded):
        src.read()
    assert src.unreadable == 1


class FakeCamera:
    """A cv2.VideoCapture stand-in: the script says, per open, how many frames it delivers."""

    def __init__(self, frames, opened=True):
        self.frames, self.opened = frames, opened

    def isOpened(self):
        return self.opened

    def read(self):
        if self.frames > 0:
            self.frames -= 1
            return True, np.full((8, 8, 3), 7, np.uint8)
        return False, None

    def release(self):
        pass


def test_webcam_that_drops_out_is_reopened_with_backoff():
    script = iter([FakeCamera(3), FakeCamera(0, opened=False), FakeCamera(0), FakeCamera(2)])
    cam = WebcamSource(0, opener=lambda i: next(script), backoff=(0.01, 0.04), give_up_s=5)
    got = [cam.read() for _ in range(5)]  # 3 frames, drop out, two failed reopens, 2 frames
    assert len(got) == 5 and cam.reopens == 3
    with pytest.raises(SourceEnded):
        WebcamSource(0, opener=lambda i: FakeCamera(0), backoff=(0.01, 0.02), give_up_s=0.1).read()


def test_webcam_that_does_not_exist_is_a_user_error():
    with pytest.raises(UserError, match="webcam 3 could not be opened"):
        WebcamSource(3, opener=lambda i: FakeCamera(0, opened=False))


def test_array_source_loops():
    src = ArraySource([np.zeros((4, 4, 3), np.uint8)], loop=True)
    assert len([src.read() for _ in range(3)]) == 3
