"""The headset's health counts (device/health.py) and how the sync client sends them: one report
per model version; what the cloud did not take (5xx) is merged into the next report, what it can
never take (404: a version it does not know) is dropped."""
from __future__ import annotations

import json

import httpx
import pytest

from device.health import HealthMeter
from device.sync import SyncClient, UploadRefused


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_health_meter_counts_per_version_and_merges_what_was_not_sent(tmp_path):
    clock = Clock()
    meter = HealthMeter(clock)
    for t, ms in ((0.0, 10.0), (0.5, 20.0), (1.0, 30.0)):  # 3 frames in 1 s: 2 frame intervals
        clock.t = t
        meter.frame("v1", ms)
    meter.inference_error("v2")
    meter.rollback("v2")
    meter.frame("v2", 0.0)
    assert meter.take() == [
        {"version": "v1", "frames": 3, "fps": 2.0, "latency_ms": 20.0, "rollbacks": 0, "inference_errors": 0},
        {"version": "v2", "frames": 1, "fps": 0.0, "latency_ms": 0.0, "rollbacks": 1, "inference_errors": 1}]
    assert meter.take() == []

    answers = {"v1": [503, 202], "v3": [404]}
    posted = []

    def handle(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        posted.append(body)
        return httpx.Response(answers[body["version"]].pop(0), json={"release": None, "state": None})

    client = SyncClient("http://cloud", "hs1.secret", trust_key=b"k" * 32, download_dir=tmp_path, health=meter,
                        http=httpx.Client(transport=httpx.MockTransport(handle), base_url="http://cloud"),
                        log=lambda m: None)
    for t, ms in ((10.0, 10.0), (12.0, 30.0)):  # 2 frames 2 s apart: 0.5 fps
        clock.t = t
        meter.frame("v1", ms)
    meter.frame("v3", 5.0)
    with pytest.raises(UploadRefused):
        client.send_health()  # 503 on the first report: both are kept
    clock.t = 20.0
    meter.inference_error("v1")  # counted with the frame it happened on
    meter.frame("v1", 60.0)  # one more frame: no interval of its own
    assert client.send_health() == 1
    assert posted[-2] == {"version": "v1", "frames": 3, "fps": round(0.5 * 2 / 3, 3), "latency_ms": 33.333,
                          "rollbacks": 0, "inference_errors": 1}
    assert posted[-1]["version"] == "v3" and client.stats.health_dropped == 1
    assert (client.stats.health_reports, meter.take()) == (1, [])


def test_an_error_is_reported_with_its_frame_never_before_it():
    """A report taken between a frame's failed inference and the frame being counted does not
    carry the error alone (it once said 531 errors over 530 frames); flush() counts what a stopped
    loop left."""
    meter = HealthMeter(Clock())
    meter.frame("v2", 1.0)
    meter.inference_error("v2")
    meter.rollback("v2")
    assert [(r["frames"], r["inference_errors"], r["rollbacks"]) for r in meter.take()] == [(1, 0, 0)]
    meter.frame("v2", 1.0)
    assert [(r["frames"], r["inference_errors"], r["rollbacks"]) for r in meter.take()] == [(1, 1, 1)]
    meter.inference_error("v2")
    meter.flush()
    assert [(r["frames"], r["inference_errors"]) for r in meter.take()] == [(0, 1)]
