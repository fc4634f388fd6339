"""The window path, under a virtual X server (Debian's xvfb): read the screen's pixels back."""
import json
import os
import select
import shutil
import signal
import struct
import subprocess
import sys
import time

import cv2
import numpy as np
import pytest

from tests.device.conftest import ROOT

pytestmark = pytest.mark.skipif(shutil.which("Xvfb") is None,
                                reason="Xvfb is not installed (apt-get install xvfb): the window test needs it")


def read_xwd(path) -> np.ndarray:
    """Xvfb's -fbdir screen file (XWD format, 24-bit TrueColor) -> RGB uint8 HxWx3."""
    data = open(path, "rb").read()
    fields = struct.unpack(">25I", data[:100])
    header_size, width, height = fields[0], fields[4], fields[5]
    byte_order, bpp, bytes_per_line, ncolors = fields[7], fields[11], fields[12], fields[19]
    masks = fields[14:17]
    assert bpp == 32, f"expected 32 bits per pixel, got {bpp}"
    start = header_size + ncolors * 12
    dtype = "<u4" if byte_order == 0 else ">u4"
    px = np.frombuffer(data, dtype, count=height * bytes_per_line // 4, offset=start)
    px = px.reshape(height, bytes_per_line // 4)[:, :width]
    out = []
    for mask in masks:
        shift = (mask & -mask).bit_length() - 1
        out.append(((px & mask) >> shift).astype(np.uint8))
    return np.stack(out, axis=-1)


def _start_xvfb(fbdir) -> tuple[subprocess.Popen, str]:
    """Xvfb on a display number it picks free itself (-displayfd), never one another X server on
    this machine has: a fixed number could land the window on someone else's screen."""
    read_end, write_end = os.pipe()
    xvfb = subprocess.Popen(["Xvfb", "-displayfd", str(write_end), "-screen", "0", "320x240x24", "-fbdir", str(fbdir),
                             "-nolisten", "tcp"], pass_fds=(write_end,),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.close(write_end)
    number = b""
    deadline = time.time() + 30
    try:
        while not number.endswith(b"\n") and time.time() < deadline:
            if select.select([read_end], [], [], 0.5)[0]:
                chunk = os.read(read_end, 16)
                if not chunk:
                    break
                number += chunk
    finally:
        os.close(read_end)
    if not number.strip().isdigit():
        xvfb.kill()
        pytest.fail(f"Xvfb did not start (it said {number!r})")
    return xvfb, f":{number.strip().decode()}"


def _show_on_a_display(model, work) -> str | None:
    """One headset run on a fresh Xvfb: None when the window showed the overlay and the run ended
    cleanly as a window run, else what went wrong (with what the headset said and the screen held)."""
    fbdir = work / "fb"
    fbdir.mkdir(parents=True)
    xvfb, display = _start_xvfb(fbdir)
    device = None
    try:
        screen = fbdir / "Xvfb_screen0"
        assert screen.exists(), "Xvfb did not write its screen file"
        images = work / "images"
        images.mkdir()
        cv2.imwrite(str(images / "gray.png"), np.full((120, 160, 3), 64, np.uint8))
        env = dict(os.environ, PYTHONPATH=str(ROOT), DISPLAY=display, QT_QPA_PLATFORM="xcb")
        device = subprocess.Popen([sys.executable, "-m", "hmd", "device", "--model", str(model), "--source",
                                   f"images:{images}", "--loop", "--fps", "20", "--mode", "colour",
                                   "--duration", "120", "--json"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        # toy colour of gray 64 = RGB (64, 191, 128): wait until the window shows it
        target = np.array([64, 191, 128])
        found = 0
        deadline = time.time() + 60  # a loaded machine: the headset process imports for a while
        while time.time() < deadline and device.poll() is None:
            pixels = read_xwd(screen).astype(int)
            found = int((np.abs(pixels - target).max(axis=2) <= 2).sum())
            if found >= 100 * 140:  # most of the 160x120 frame below the HUD band
                break
            time.sleep(0.2)
        if device.poll() is not None:
            return f"the headset exited {device.returncode}: {device.stderr.read()[-1500:]}"
        colours, counts = np.unique(read_xwd(screen).reshape(-1, 3), axis=0, return_counts=True)  # before it closes
        device.send_signal(signal.SIGTERM)  # ends the run cleanly: summary, exit 0
        out, err = device.communicate(timeout=20)
        if found < 100 * 140:  # say what the headset saw: its summary and log
            common = [(c.tolist(), int(n)) for c, n in sorted(zip(colours, counts), key=lambda cn: -cn[1])[:5]]
            try:
                summary = json.loads(out)
                said = {k: summary.get(k) for k in ("display", "headless_reason", "frames_shown", "fps", "loop")}
            except ValueError:
                said = {"stdout": out[-500:]}
            return (f"only {found} pixels of the overlay colour on screen (most common colours {common}); "
                    f"the headset said {said}, stderr {err[-800:]!r}")
        assert device.returncode == 0, err
        summary = json.loads(out)
        assert summary["display"] == "window" and summary["frames_shown"] > 0 and summary["mode"] == "colour"
        assert summary["exit_reason"] == "stopped"
        return None
    finally:
        if device is not None and device.poll() is None:
            device.kill()
        xvfb.terminate()
        xvfb.wait(10)


def test_window_shows_the_overlay_on_a_display(toy, tmp_path):
    """Two tries, each on a fresh X server: about 1 fresh-clone CI run in 4 on this machine saw
    the screen stay black for the whole first minute while the headset ran (cause not found; the
    first try's report is printed). Both failing fails the test."""
    model = toy("win")
    first = _show_on_a_display(model, tmp_path / "try1")
    if first is None:
        return
    print(f"window test, first try: {first}")
    second = _show_on_a_display(model, tmp_path / "try2")
    assert second is None, f"{second} (first try: {first})"
