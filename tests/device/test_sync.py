"""The headset's sync client against a real server (uvicorn on 127.0.0.1, fast fake jobs)."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest

from cloud.app import create_app
from cloud.settings import Settings
from device.journal import Journal
from device.sync import ModelVerificationError, SyncClient, parse_sse, verify_model_folder
from shared.worlds import render_scene
from tests.cloud import fakes
from tests.cloud.conftest import ThreadedServer, data_dir, free_port, provision, public_key, registry_template, \
    base_run, wait_for  # noqa: F401  (fixtures)


def journal_with_frames(root, n: int, start: int = 0) -> Journal:
    j = Journal(root).start()
    for i in range(start, start + n):
        rgb, _ = render_scene("forest", 3, i, 32)
        assert j.submit(rgb, {"frame_index": i, "reason": "every-k"})
        time.sleep(0.002)
    j.close()
    return j


def client(url, token, data_dir, tmp_path, **kw) -> SyncClient:
    kw.setdefault("backoff_initial", 0.05)
    kw.setdefault("backoff_max", 0.2)
    return SyncClient(url, token, trust_key=public_key(data_dir), download_dir=tmp_path / "downloads",
                      log=lambda m: None, **kw)


def test_uploads_catch_up_after_offline_and_never_resend(data_dir, tmp_path):
    token = provision(data_dir, "wearer1")
    journal = journal_with_frames(tmp_path / "journal", 10)
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there: the headset is offline
    offline = client(dead, token, data_dir, tmp_path, journal=journal, batch_frames=4, timeout=2)
    with pytest.raises(Exception):
        offline.upload_pending()
    assert journal.uploaded_through() == -1
    offline.start()
    wait_for(lambda: offline.stats.upload_failures >= 2, what="retries while offline")
    offline.stop()
    assert journal.uploaded_through() == -1

    with ThreadedServer(create_app(Settings(data_dir=data_dir, auto_job_frames=0), runner=fakes.accept_job)) as srv:
        sync = client(srv.url, token, data_dir, tmp_path, journal=journal, batch_frames=4, upload_interval=0.05)
        sync.start()
        wait_for(lambda: journal.uploaded_through() == 9, what="the journal to be uploaded")
        sync.stop()
        assert sync.stats.uploaded_batches == 3 and sync.stats.uploaded_frames == 10
        assert not journal.pending_batches()
        assert sync.upload_pending() == 0  # nothing is sent twice
        more = journal_with_frames(tmp_path / "journal", 3, start=10)
        assert client(srv.url, token, data_dir, tmp_path, journal=more).upload_pending() == 1
    from cloud.storage import SQLiteStorage
    s = SQLiteStorage(data_dir / "cloud.sqlite3")
    assert (s.upload_count(), s.frame_count()) == (4, 13)
    s.close()


def test_event_stream_delivers_a_verified_model_to_the_runtime(data_dir, tmp_path):
    token = provision(data_dir, "wearer1")
    journal = journal_with_frames(tmp_path / "journal", 6)
    offered = []
    settings = Settings(data_dir=data_dir, auto_job_frames=6, sse_keepalive_s=0.5)
    with ThreadedServer(create_app(settings, runner=fakes.accept_job)) as srv:
        sync = client(srv.url, token, data_dir, tmp_path, journal=journal, offer=offered.append,
                      current_version=lambda: offered and json.loads((offered[-1] / "manifest.json").read_text())[
                          "version"] or "base-v1", upload_interval=0.05)
        sync.start()
        wait_for(lambda: offered, timeout=20, what="a model offer")
        sync.stop()
    folder = offered[0]
    m = verify_model_folder(folder, public_key(data_dir))
    assert m.version.startswith("wearer1-j_") and m.parent_version == "base-v1"
    assert sync.stats.sse_connects >= 1 and sync.stats.models_offered == 1 and sync.stats.mode == "sse"
    assert [e["event"] for e in sync.stats.timeline] == ["event", "downloaded", "offered"]


def test_polling_fallback_when_events_are_unavailable(data_dir, tmp_path):
    token = provision(data_dir, "wearer1")
    offered = []
    inner = create_app(Settings(data_dir=data_dir), runner=fakes.accept_job)

    async def app(scope, receive, send):  # a proxy that does not pass event streams
        if scope["type"] == "http" and scope["path"] == "/v1/events":
            await send({"type": "http.response.start", "status": 404, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        await inner(scope, receive, send)
    with ThreadedServer(app) as srv:
        sync = client(srv.url, token, data_dir, tmp_path, offer=offered.append, current_version=lambda: None,
                      poll_interval=0.1, sse_failures_before_polling=2)
        sync.start()
        wait_for(lambda: offered, timeout=20, what="a model by polling")
        sync.stop()
    assert sync.stats.mode == "polling" and sync.stats.polls >= 1
    assert verify_model_folder(offered[0], public_key(data_dir)).version == "base-v1"


def _tamper_blob(data_dir, sha: str, mutate) -> None:
    path = data_dir / "blobs" / sha[:2] / sha
    path.chmod(0o644)
    path.write_bytes(mutate(path.read_bytes()))


@pytest.mark.parametrize("what", ["model", "manifest", "signature", "wrong key"])
def test_tampered_models_are_rejected_by_the_device(data_dir, tmp_path, what):
    from cloud.storage import SQLiteStorage

    token = provision(data_dir, "wearer1")
    s = SQLiteStorage(data_dir / "cloud.sqlite3")
    base = s.version("base-v1")
    s.close()
    if what == "model":
        _tamper_blob(data_dir, base.onnx_sha256, lambda b: b[:-1] + bytes([b[-1] ^ 1]))
    elif what == "manifest":  # claim other metrics without re-signing
        _tamper_blob(data_dir, base.manifest_sha256,
                     lambda b: json.dumps({**json.loads(b), "metrics": {"held_out": {"class_error_pct": 0.0}}}).encode())
    elif what == "signature":
        _tamper_blob(data_dir, base.manifest_sha256,
                     lambda b: json.dumps({**json.loads(b), "signature": "A" * 88}).encode())
    offered = []
    with ThreadedServer(create_app(Settings(data_dir=data_dir), runner=fakes.accept_job)) as srv:
        key = public_key(data_dir) if what != "wrong key" else bytes(32)
        sync = SyncClient(srv.url, token, trust_key=key if what != "wrong key" else
                          __import__("shared.hashing", fromlist=["x"]).generate_keypair()[1],
                          download_dir=tmp_path / "dl", offer=offered.append, current_version=lambda: None,
                          log=lambda m: None)
        assert sync.check_for_model() is None
        sync.stop()
    assert offered == [] and sync.stats.models_rejected == 1
    assert not (tmp_path / "dl" / "base-v1").exists()


def test_interrupted_download_resumes_with_range(data_dir, tmp_path):
    token = provision(data_dir, "wearer1")
    with ThreadedServer(create_app(Settings(data_dir=data_dir), runner=fakes.accept_job)) as srv:
        import httpx
        full = httpx.get(f"{srv.url}/v1/models/base-v1/model.onnx", headers={"Authorization": f"Bearer {token}"})
        partial = tmp_path / "dl" / ".partial"
        partial.mkdir(parents=True)
        (partial / "base-v1.onnx").write_bytes(full.content[:5000])  # a download cut off at 5000 bytes
        (partial / "base-v1.etag").write_text(full.headers["etag"])
        seen = []
        sync = SyncClient(srv.url, token, trust_key=public_key(data_dir), download_dir=tmp_path / "dl",
                          offer=seen.append, current_version=lambda: None, log=lambda m: None)
        orig = sync._http.stream

        def spy(method, url, headers=None, **kw):
            if url.endswith("model.onnx"):
                seen.append(headers.get("Range"))
            return orig(method, url, headers=headers, **kw)
        sync._http.stream = spy
        folder = sync.check_for_model()
        sync.stop()
    assert seen[0] == "bytes=5000-" and len(seen) == 2  # one resumed GET, then the offer
    assert (folder / "model.onnx").read_bytes() == full.content
    verify_model_folder(folder, public_key(data_dir))


def test_verify_model_folder_and_sse_parser(tmp_path):
    assert list(parse_sse(["retry: 10", "", ": ka", "event: model_available", "data: {\"a\":1}", "", "data: x",
                           ""])) == [("model_available", '{"a":1}'), ("message", "x")]
    (tmp_path / "manifest.json").write_text("{}")
    (tmp_path / "model.onnx").write_bytes(np.zeros(4).tobytes())
    with pytest.raises(ModelVerificationError):
        verify_model_folder(tmp_path, bytes(32))


# -- attacks on the headset (issue 13) and the sync client's failure modes (issue 16) -----------
def _base(data_dir) -> tuple[bytes, bytes]:
    """(manifest bytes, ONNX bytes) of the registry's base version."""
    from cloud.storage import SQLiteStorage

    s = SQLiteStorage(data_dir / "cloud.sqlite3")
    base = s.version("base-v1")
    s.close()
    read = lambda sha: (data_dir / "blobs" / sha[:2] / sha).read_bytes()  # noqa: E731
    return read(base.manifest_sha256), read(base.onnx_sha256)


def signed_variant(data_dir, version: str, sequence: int, device: str | None) -> tuple[bytes, bytes]:
    """The base model re-signed by the cloud's key as ``version`` with a sequence and a device."""
    from cloud.keys import SigningKey
    from shared.manifest import Manifest

    manifest, onnx = _base(data_dir)
    m = Manifest.from_bytes(manifest).model_copy(update={"version": version})
    return SigningKey(data_dir).sign_manifest(m, sequence=sequence, device=device).to_json().encode(), onnx


class FakeCloud:
    """An httpx transport serving fixed model files on http://cloud, recording every request."""

    def __init__(self, models: dict[str, tuple[bytes, bytes]], status: int | None = None):
        import httpx

        self.models, self.status, self.requests = models, status, []
        self.http = httpx.Client(transport=httpx.MockTransport(self.handle), base_url="http://cloud")

    def handle(self, request):
        import httpx

        self.requests.append(request)
        if self.status is not None:
            return httpx.Response(self.status, json={"error": "unauthorised", "detail": "no"})
        if request.url.host != "cloud":
            return httpx.Response(200, content=b"{}")
        parts = request.url.path.split("/")  # /v1/models/VERSION/FILE
        manifest, onnx = self.models[parts[3]]
        return httpx.Response(200, content=manifest if parts[4] == "manifest" else onnx,
                              headers={"ETag": f'"{parts[3]}"'})

    def event(self, version: str, manifest_url: str | None = None):
        from shared.manifest import Manifest
        from shared.wire import ModelAvailable

        m = Manifest.from_bytes(self.models[version][0])
        return ModelAvailable(version=version, sha256=m.sha256, manifest_url=manifest_url or
                              f"/v1/models/{version}/manifest", model_url=f"/v1/models/{version}/model.onnx")


def fake_client(cloud: FakeCloud, data_dir, tmp_path, token="wearer1.secret", **kw) -> SyncClient:
    offered = kw.pop("offered", [])
    return SyncClient("http://cloud", token, trust_key=public_key(data_dir), download_dir=tmp_path / "dl",
                      offer=offered.append, current_version=lambda: None, http=cloud.http, log=lambda m: None, **kw)


def test_attack_downgrade_to_an_older_signed_version_is_refused(data_dir, tmp_path):
    cloud = FakeCloud({"v-old": signed_variant(data_dir, "v-old", 3, "wearer1"),
                       "v-new": signed_variant(data_dir, "v-new", 9, "wearer1")})
    offered = []
    sync = fake_client(cloud, data_dir, tmp_path, offered=offered, running_sequence=lambda: 7)
    assert sync.handle_model_available(cloud.event("v-old")) is None
    assert offered == [] and sync.stats.models_rejected == 1 and "older than the running" in sync.stats.last_error
    assert not any(r.url.path.endswith("model.onnx") for r in cloud.requests)  # refused before downloading
    assert sync.handle_model_available(cloud.event("v-new")) is not None and len(offered) == 1


def test_attack_model_signed_for_another_device_is_refused(data_dir, tmp_path):
    cloud = FakeCloud({"v-bob": signed_variant(data_dir, "v-bob", 5, "bob")})
    offered = []
    sync = fake_client(cloud, data_dir, tmp_path, token="alice.secret", offered=offered)
    assert sync.handle_model_available(cloud.event("v-bob")) is None
    assert offered == [] and "signed for device bob" in sync.stats.last_error


def test_attack_absolute_manifest_url_never_gets_the_token(data_dir, tmp_path):
    cloud = FakeCloud({"v1": signed_variant(data_dir, "v1", 5, "wearer1")})
    sync = fake_client(cloud, data_dir, tmp_path)
    for url in ("http://evil.example/steal", "//evil.example/steal", "https://cloud/v1/models/v1/manifest"):
        assert sync.handle_model_available(cloud.event("v1", manifest_url=url)) is None
        sync._handled.clear()
    assert cloud.requests == [] and "refusing to fetch" in sync.stats.last_error
    # the cloud's own absolute URL is fine
    assert sync.handle_model_available(cloud.event("v1", manifest_url="http://cloud/v1/models/v1/manifest"))


def test_attack_oversized_model_download_is_cut_off(data_dir, tmp_path):
    cloud = FakeCloud({"v1": signed_variant(data_dir, "v1", 5, "wearer1")})
    sync = fake_client(cloud, data_dir, tmp_path, max_model_bytes=1000)
    assert sync.handle_model_available(cloud.event("v1")) is None
    assert "larger than 1000 bytes" in sync.stats.last_error
    assert not [p for p in (tmp_path / "dl").rglob("*") if p.is_file()]


def test_attack_corrupt_partial_download_is_fetched_again_not_blocked(data_dir, tmp_path):
    token = provision(data_dir, "wearer1")
    with ThreadedServer(create_app(Settings(data_dir=data_dir), runner=fakes.accept_job)) as srv:
        import httpx
        full = httpx.get(f"{srv.url}/v1/models/base-v1/model.onnx", headers={"Authorization": f"Bearer {token}"})
        partial = tmp_path / "dl" / ".partial"
        partial.mkdir(parents=True)
        (partial / "base-v1.onnx").write_bytes(b"\0" * 5000)  # corrupt bytes, with the right ETag
        (partial / "base-v1.etag").write_text(full.headers["etag"])
        ranges = []
        sync = SyncClient(srv.url, token, trust_key=public_key(data_dir), download_dir=tmp_path / "dl",
                          offer=lambda f: None, current_version=lambda: None, log=lambda m: None)
        orig = sync._http.stream

        def spy(method, url, headers=None, **kw):
            if url.endswith("model.onnx"):
                ranges.append(headers.get("Range"))
            return orig(method, url, headers=headers, **kw)
        sync._http.stream = spy
        folder = sync.check_for_model()
        sync.stop()
    assert ranges == ["bytes=5000-", None]  # resumed, failed the hash, downloaded whole
    assert folder is not None and (folder / "model.onnx").read_bytes() == full.content
    assert sync.offered_versions == ["base-v1"]


def test_rolled_back_model_is_not_fetched_again_after_a_restart(data_dir, tmp_path):
    from device.store import ModelStore

    cloud = FakeCloud({"v1": signed_variant(data_dir, "v1", 5, "wearer1")})
    event = cloud.event("v1")
    ModelStore(tmp_path / "store").mark_rejected(event.sha256, "v1", "rolled back: NaN")
    store = ModelStore(tmp_path / "store")  # a new process
    sync = fake_client(cloud, data_dir, tmp_path, known_bad=lambda sha: sha in store.rejected())
    assert sync.handle_model_available(event) is None and cloud.requests == []


def test_token_rejected_is_reported_once_and_not_retried(data_dir, tmp_path):
    """Issue 16 (3): a wrong token stops syncing with one line; journaling is not affected."""
    journal = journal_with_frames(tmp_path / "journal", 3)
    cloud = FakeCloud({}, status=401)
    lines = []
    sync = SyncClient("http://cloud", "wearer1.wrong", trust_key=public_key(data_dir), download_dir=tmp_path / "dl",
                      journal=journal, offer=lambda f: None, current_version=lambda: None, http=cloud.http,
                      log=lines.append, backoff_initial=0.01, backoff_max=0.02, upload_interval=0.01,
                      poll_interval=0.01)
    sync.start()
    time.sleep(1.0)
    sync.stop()
    assert sync.stats.token_rejected and sync.summary()["token_rejected"]
    assert [line for line in lines if "token rejected by http://cloud" in line] == [lines[0]] and len(lines) == 1
    assert len(cloud.requests) <= 2  # one upload, one event stream: no retry storm
    assert journal.uploaded_through() == -1 and len(journal.pending_batches()) == 1


def test_stop_is_prompt_and_the_summary_reports_the_sync(data_dir, tmp_path):
    """Issue 16 (2): stopping with an open event stream takes well under the keepalive."""
    token = provision(data_dir, "wearer1")
    journal = journal_with_frames(tmp_path / "journal", 5)
    settings = Settings(data_dir=data_dir, auto_job_frames=0, sse_keepalive_s=30)
    with ThreadedServer(create_app(settings, runner=fakes.accept_job)) as srv:
        sync = client(srv.url, token, data_dir, tmp_path, journal=journal, offer=lambda f: None,
                      current_version=lambda: "base-v1", upload_interval=0.05)
        sync.start()
        wait_for(lambda: sync.stats.sse_connects >= 1 and journal.uploaded_through() == 4, what="sync")
        t0 = time.monotonic()
        sync.stop()
        took = time.monotonic() - t0
    assert took < 1.5, took
    summary = sync.summary()
    assert summary["uploads"] == 1 and summary["frames"] == 5 and summary["bytes"] > 5 * 500
    assert summary["refused_batches"] == 0 and not summary["token_rejected"] and summary["device"] == "wearer1"
