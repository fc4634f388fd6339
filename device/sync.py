"""The headset's sync client: journal uploads out, verified models in.

Two daemon threads, both of which survive any network failure:

* **upload**: sends the journal's not-yet-uploaded batches, oldest first, as upload archives
  (:func:`shared.wire.build_upload_archive`); a batch is marked uploaded only after the cloud
  answered 200/201, so it is never sent twice once acknowledged, and a batch sent but not
  acknowledged (the connection dropped) is recognised by the cloud as a repeat when retried.
  Failures back off exponentially (with jitter) up to ``backoff_max``; the headset keeps
  journalling offline and the thread catches up when the cloud is back.
* **models**: listens to ``GET /v1/events`` (server-sent events) and reconnects with backoff;
  after ``sse_failures_before_polling`` failed connections in a row it polls
  ``GET /v1/models/current`` every ``poll_interval`` seconds between further SSE attempts.
  A ``model_available`` for a version it does not run yet is downloaded (resumable: ``Range``
  + ``If-Range`` on the ETag), verified (Ed25519 signature of the manifest with the trusted
  public key, sha256 of the ONNX file) and only then handed to ``offer(folder)`` -- the
  runtime's verified hot-swap (:meth:`device.hotswap.ModelManager.offer`). A signed manifest
  for another device, or with an older sequence than the running model's, is refused (a
  downgrade needs the user's explicit rollback); manifest and model sizes are bounded; URLs
  are fetched with the token only on the cloud's own origin.

What the cloud answers decides what happens to a batch: 200/201 acknowledged; 409 the same
frames are stored already (acknowledged); 400/413 this batch can never be accepted (skipped,
counted as refused); 401 the token is rejected (reported once, syncing stops, journaling goes
on); anything else (429, 5xx, network) is retried with backoff, the batch kept.

A third thread, **health** (when the runtime's :class:`device.health.HealthMeter` is given),
posts one ``POST /v1/health`` report per model version every ``health_interval`` seconds and
once more when the client stops: frames, FPS, mean inference latency, rollbacks and inference
errors since the last report, so that a staged release's canary halts by itself on real
headsets' numbers (cloud/rollout.py). A report the cloud did not take (network, 429, 5xx) is
put back into the meter and merged into the next; one it can never take (404: the cloud does
not know that version, e.g. a model from ``--watch``; 400/422) is dropped with a log line.

numpy/opencv-free and torch-free: httpx and the shared schemas only.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import shutil
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit
from typing import Any, Callable, Iterable, Protocol

import httpx

from shared.atomic import atomic_write_bytes, atomic_write_text, fsync_dir
from shared.errors import UserError
from shared.hashing import verify as verify_signature
from shared.manifest import Manifest
from shared.wire import UPLOAD_CONTENT_TYPE, ModelAvailable, build_upload_archive


class ModelVerificationError(UserError):
    """A downloaded model failed verification (signature, hash, or version); it is never offered."""


class PendingBatch(Protocol):
    first_seq: int
    last_seq: int

    def load(self) -> list[tuple[dict, bytes]]: ...


class HealthLike(Protocol):
    """What the client needs of :class:`device.health.HealthMeter`."""

    def take(self) -> list[dict]: ...
    def restore(self, reports: list[dict]) -> None: ...


class JournalLike(Protocol):
    """What the client needs of :class:`device.journal.Journal`."""

    def pending_batches(self, max_frames: int = 64, max_batches: int | None = None) -> list[Any]: ...
    def mark_uploaded(self, batch: Any) -> None: ...


class Backoff:
    """Exponential backoff with full jitter: 0..min(max, initial * 2**n) seconds."""

    def __init__(self, initial: float = 1.0, maximum: float = 60.0, rng: random.Random | None = None):
        self.initial, self.maximum, self.failures = initial, maximum, 0
        self._rng = rng or random.Random()

    def next(self) -> float:
        delay = min(self.maximum, self.initial * (2 ** self.failures))
        self.failures += 1
        return delay * (0.5 + 0.5 * self._rng.random())

    def reset(self) -> None:
        self.failures = 0


@dataclasses.dataclass
class SyncStats:
    uploaded_batches: int = 0
    uploaded_frames: int = 0
    uploaded_bytes: int = 0
    duplicate_batches: int = 0
    refused_batches: int = 0  # the cloud answered 400/413 (e.g. an unreadable frame on disk): skipped
    upload_failures: int = 0
    token_rejected: bool = False  # the cloud answered 401: syncing stopped, journaling goes on
    sse_connects: int = 0
    sse_failures: int = 0
    polls: int = 0
    models_downloaded: int = 0
    models_offered: int = 0
    models_rejected: int = 0
    health_reports: int = 0  # reports the cloud took (202)
    health_dropped: int = 0  # reports it can never take (404: a version it does not know; 400/422)
    health_failures: int = 0  # sends that failed and were put back
    mode: str = "sse"
    last_error: str | None = None
    timeline: list[dict] = dataclasses.field(default_factory=list)  # model events with timestamps


class TokenRejected(Exception):
    """The cloud answered 401: the device token is wrong or was revoked."""


MAX_MANIFEST_BYTES = 1024 * 1024
MAX_MODEL_BYTES = 512 * 1024 * 1024


def token_device(token: str) -> str | None:
    """The device name a ``NAME.SECRET`` token is for."""
    name, sep, _ = token.partition(".")
    return name if sep and name else None


def check_manifest_binding(manifest: Manifest, device: str | None, running_sequence: int | None,
                           allow_older: bool = False) -> None:
    """Refuse a signed manifest made for another device, or older than the running model's."""
    if manifest.device is not None and device is not None and manifest.device != device:
        raise ModelVerificationError(f"model {manifest.version} is signed for device {manifest.device}, "
                                     f"not this one ({device})")
    if running_sequence is not None and not allow_older:
        if manifest.sequence is None or manifest.sequence < running_sequence:
            raise ModelVerificationError(
                f"model {manifest.version} (sequence {manifest.sequence}) is older than the running model "
                f"(sequence {running_sequence}); a downgrade needs an explicit rollback")


def verify_manifest(manifest_bytes: bytes, public_key: bytes, expect_version: str | None = None) -> Manifest:
    """Parse and check a manifest's Ed25519 signature (and version, when expected)."""
    try:
        manifest = Manifest.from_bytes(manifest_bytes)
    except UserError as exc:
        raise ModelVerificationError(str(exc)) from None
    if not manifest.signature:
        raise ModelVerificationError(f"manifest of {manifest.version} is not signed")
    if not verify_signature(public_key, manifest.canonical_bytes(), manifest.signature):
        raise ModelVerificationError(f"manifest of {manifest.version}: the signature does not verify with the "
                                     "trusted key")
    if expect_version is not None and manifest.version != expect_version:
        raise ModelVerificationError(f"asked for version {expect_version}, the signed manifest says {manifest.version}")
    return manifest


def verify_model_folder(folder: str | os.PathLike, public_key: bytes) -> Manifest:
    """Check a model folder (model.onnx + manifest.json) as the sync client does before offering it."""
    folder = Path(folder)
    manifest = verify_manifest((folder / "manifest.json").read_bytes(), public_key)
    actual = _sha256_file(folder / "model.onnx")
    if actual != manifest.sha256:
        raise ModelVerificationError(f"model {manifest.version}: model.onnx sha256 {actual[:12]}... does not match "
                                     f"the signed manifest ({manifest.sha256[:12]}...)")
    return manifest


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class SyncClient:
    """Background sync with the cloud. ``start()`` the threads, ``stop()`` them; every step is
    also callable directly (:meth:`upload_pending`, :meth:`check_for_model`) for tests and tools.

    ``offer(folder)`` receives a verified model folder (``model.onnx`` + ``manifest.json``);
    ``current_version()`` tells which version the headset runs, so it is not fetched again.
    """

    def __init__(self, cloud_url: str, token: str, *, trust_key: bytes, download_dir: str | os.PathLike,
                 journal: JournalLike | None = None, offer: Callable[[Path], Any] | None = None,
                 current_version: Callable[[], str | None] | None = None, batch_frames: int = 64,
                 upload_interval: float = 5.0, poll_interval: float = 30.0, backoff_initial: float = 1.0,
                 backoff_max: float = 60.0, sse_failures_before_polling: int = 3, timeout: float = 30.0,
                 http: httpx.Client | None = None, log: Callable[[str], None] | None = None,
                 running_sequence: Callable[[], int | None] | None = None,
                 known_bad: Callable[[str], bool] | None = None, max_model_bytes: int = MAX_MODEL_BYTES,
                 health: HealthLike | None = None, health_interval: float = 30.0):
        """``running_sequence()``: the running model's signed sequence (older ones are refused);
        ``known_bad(sha256)``: the runtime rejected or rolled back that model before (not fetched
        again, even after a restart); ``health``: the runtime's health meter, reported every
        ``health_interval`` seconds."""
        if len(trust_key) != 32:
            raise UserError("the trusted public key must be a raw 32-byte Ed25519 key (base64 in the key file)")
        self.base_url = cloud_url.rstrip("/")
        self.trust_key = trust_key
        self.journal, self.offer, self._current_version = journal, offer, current_version
        self.download_dir = Path(download_dir)
        self.batch_frames = max(1, batch_frames)
        self.upload_interval, self.poll_interval = upload_interval, poll_interval
        self.backoff_initial, self.backoff_max = backoff_initial, backoff_max
        self.sse_failures_before_polling = max(1, sse_failures_before_polling)
        self.timeout = timeout
        self._http = http or httpx.Client(base_url=self.base_url, timeout=httpx.Timeout(timeout, read=timeout * 2))
        self._owns_http = http is None
        self._headers = {"Authorization": f"Bearer {token}"}
        self.device = token_device(token)
        self._running_sequence = running_sequence or (lambda: None)
        self._known_bad = known_bad or (lambda sha: False)
        self.max_model_bytes = max_model_bytes
        self.health, self.health_interval = health, health_interval
        self._download_failures: dict[str, int] = {}
        self._log = log or (lambda msg: print(f"hmd device sync: {msg}", file=sys.stderr, flush=True))
        self.stats = SyncStats()
        self._stop = threading.Event()
        self._wake_upload = threading.Event()
        self._threads: list[threading.Thread] = []
        self._stream: httpx.Response | None = None
        self._model_lock = threading.Lock()
        self._handled: set[tuple[str, str]] = set()  # (version, sha256) offered or rejected: never fetched again
        self.offered_versions: list[str] = []
        self._stream_socket: socket.socket | None = None

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> "SyncClient":
        self._stop.clear()
        if self.journal is not None:
            self._threads.append(threading.Thread(target=self._upload_loop, name="hmd-sync-upload", daemon=True))
        if self.offer is not None:
            self._threads.append(threading.Thread(target=self._model_loop, name="hmd-sync-models", daemon=True))
        if self.health is not None:
            self._threads.append(threading.Thread(target=self._health_loop, name="hmd-sync-health", daemon=True))
        for t in self._threads:
            t.start()
        return self

    def stop(self, timeout: float = 2.0) -> None:
        """Stop the threads within ``timeout`` seconds: the event stream's socket is shut down
        (a blocked read returns at once); an upload still in flight is abandoned (the batch is
        not marked, so it is sent again, and recognised as a repeat, next time); the health
        thread sends its last report first."""
        self._stop.set()
        self._wake_upload.set()
        sock = self._stream_socket
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked reading the event stream
            except OSError:
                pass
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        alive = [t for t in self._threads if t.is_alive()]
        self._threads = []
        if self._owns_http and not alive:
            self._http.close()

    def summary(self) -> dict:
        """The ``sync`` section of the device's JSON summary."""
        st = self.stats
        return {"cloud": self.base_url, "device": self.device, "token_rejected": st.token_rejected,
                "uploads": st.uploaded_batches, "frames": st.uploaded_frames, "bytes": st.uploaded_bytes,
                "duplicate_batches": st.duplicate_batches, "refused_batches": st.refused_batches,
                "upload_failures": st.upload_failures, "versions_received": list(self.offered_versions),
                "models_rejected": st.models_rejected, "health_reports": st.health_reports,
                "mode": st.mode, "last_error": st.last_error}

    def nudge_upload(self) -> None:
        """New frames were journalled: upload now instead of at the next interval."""
        self._wake_upload.set()

    def _error(self, msg: str) -> None:
        self.stats.last_error = msg
        self._log(msg)

    def _check_auth(self, r: httpx.Response) -> None:
        if r.status_code == 401:
            self._token_rejected()

    def _token_rejected(self) -> None:
        """Reported once; both threads then stop calling the cloud (no retry storm)."""
        if not self.stats.token_rejected:
            self.stats.token_rejected = True
            self._error(f"token rejected by {self.base_url}: uploads and model updates stop, journaling goes on "
                        "(provision the device again: `hmd cloud add-device NAME`)")
        raise TokenRejected(self.base_url)

    # -- uploads ---------------------------------------------------------------------------------
    def upload_batch(self, batch: PendingBatch) -> dict | None:
        """Send one batch; returns the cloud's receipt (None if the batch had nothing left to send).
        Raises httpx errors for network failures and :class:`UploadRefused` for 4xx answers."""
        frames = batch.load()
        if not frames:
            return None
        body = build_upload_archive(frames, first_seq=batch.first_seq, last_seq=batch.last_seq)
        r = self._http.post(f"{self.base_url}/v1/uploads", content=body,
                            headers={**self._headers, "Content-Type": UPLOAD_CONTENT_TYPE})
        self._check_auth(r)
        if r.status_code in (200, 201):
            receipt = r.json()
            receipt["frames_sent"] = len(frames)
            receipt["bytes_sent"] = len(body)
            return receipt
        raise UploadRefused(r.status_code, _error_detail(r))

    def upload_pending(self, max_batches: int | None = None) -> int:
        """Upload pending batches oldest first; returns how many were acknowledged."""
        assert self.journal is not None
        done = 0
        size = self.batch_frames
        while not self._stop.is_set() and (max_batches is None or done < max_batches):
            batches = self.journal.pending_batches(max_frames=size, max_batches=1)
            if not batches:
                break
            batch = batches[0]
            try:
                receipt = self.upload_batch(batch)
            except UploadRefused as exc:
                if exc.status == 413 and size > 1:
                    size = max(1, size // 2)  # the cloud's limit is lower than our batch: split
                    continue
                if exc.status in (400, 413):  # this batch can never be accepted: skip it, keep the rest flowing
                    self.stats.refused_batches += 1
                    self._error(f"the cloud refused frames {batch.first_seq}..{batch.last_seq} "
                                f"({exc.status}: {exc.detail}); skipping them")
                    self.journal.mark_uploaded(batch)
                    continue
                if exc.status == 409:  # these frames are stored already (with other metadata): done
                    self.stats.duplicate_batches += 1
                    self._log(f"frames {batch.first_seq}..{batch.last_seq}: {exc.detail}")
                    self.journal.mark_uploaded(batch)
                    done += 1
                    continue
                raise  # 429, 5xx: the server's problem; the batch is kept and retried
            self.journal.mark_uploaded(batch)
            done += 1
            if receipt is not None:
                self.stats.uploaded_batches += 1
                self.stats.uploaded_frames += receipt["frames_sent"]
                self.stats.uploaded_bytes += receipt["bytes_sent"]
                self.stats.duplicate_batches += int(bool(receipt.get("duplicate")))
        return done

    def _upload_loop(self) -> None:
        backoff = Backoff(self.backoff_initial, self.backoff_max)
        while not self._stop.is_set():
            if self.stats.token_rejected:
                return
            try:
                self.upload_pending()
                backoff.reset()
                delay = self.upload_interval
            except TokenRejected:
                return
            except (httpx.HTTPError, UploadRefused, OSError) as exc:
                self.stats.upload_failures += 1
                delay = backoff.next()
                self._error(f"upload failed ({_describe(exc)}); retrying in {delay:.1f}s")
            except Exception as exc:  # noqa: BLE001 - the thread must outlive anything
                self.stats.upload_failures += 1
                delay = backoff.next()
                self._error(f"upload error {type(exc).__name__}: {exc}; retrying in {delay:.1f}s")
            self._wake_upload.wait(delay)
            self._wake_upload.clear()

    # -- health ----------------------------------------------------------------------------------
    def send_health(self) -> int:
        """Post the meter's reports since the last send; returns how many the cloud took. What was
        not delivered (network, 429, 5xx) goes back into the meter; raises what stopped it."""
        assert self.health is not None
        pending = self.health.take()
        sent = 0
        try:
            while pending:
                report = pending[0]
                r = self._http.post(f"{self.base_url}/v1/health", json=report, headers=self._headers)
                self._check_auth(r)
                if r.status_code in (400, 404, 422):
                    self.stats.health_dropped += 1
                    self._log(f"health report for {report['version']} not taken ({r.status_code}: "
                              f"{_error_detail(r)}); dropped")
                elif r.status_code != 202:
                    raise UploadRefused(r.status_code, _error_detail(r))
                else:
                    self.stats.health_reports += 1
                    sent += 1
                pending = pending[1:]
        except BaseException:
            self.health.restore(pending)
            raise
        return sent

    def _health_loop(self) -> None:
        backoff = Backoff(self.backoff_initial, self.backoff_max)
        delay = self.health_interval
        while True:
            stopping = self._stop.wait(delay)
            if self.stats.token_rejected:
                return
            try:
                self.send_health()
                backoff.reset()
                delay = self.health_interval
            except TokenRejected:
                return
            except Exception as exc:  # noqa: BLE001 - network, 429, 5xx, anything: kept for the next send
                self.stats.health_failures += 1
                delay = max(self.health_interval, backoff.next())
                if not stopping:
                    self._error(f"health report failed ({_describe(exc)}); kept for the next one")
            if stopping:
                return

    # -- models ----------------------------------------------------------------------------------
    def current_version(self) -> str | None:
        if self._current_version is not None:
            return self._current_version()
        return self.offered_versions[-1] if self.offered_versions else None

    def check_for_model(self) -> Path | None:
        """Poll ``/v1/models/current``; fetch, verify and offer it if it is new. Returns the folder offered."""
        self.stats.polls += 1
        r = self._http.get(f"{self.base_url}/v1/models/current", headers=self._headers)
        self._check_auth(r)
        if r.status_code == 404:
            return None
        if r.status_code != 200:
            raise UploadRefused(r.status_code, _error_detail(r))
        info = r.json()
        return self.handle_model_available(ModelAvailable(
            version=info["version"], sha256=info["sha256"], parent_version=info.get("parent_version"),
            manifest_url=info["manifest_url"], model_url=info["model_url"]))

    def handle_model_available(self, event: ModelAvailable) -> Path | None:
        """Fetch, verify and offer a model unless it is the one running or was handled before."""
        with self._model_lock:
            key = (event.version, event.sha256)
            if event.version == self.current_version() or key in self._handled:
                return None
            if self._known_bad(event.sha256):
                self._handled.add(key)
                self._log(f"model {event.version} was rejected or rolled back before; not fetching it again")
                return None
            self._mark("event", event.version)
            try:
                folder = self.fetch(event)
            except DownloadCorrupt as exc:  # maybe a bad line or a bad resume: the next event or poll retries
                failures = self._download_failures[event.sha256] = self._download_failures.get(event.sha256, 0) + 1
                if failures >= 3:
                    self._handled.add(key)
                self.stats.models_rejected += 1
                self._error(f"model {event.version}: {exc}" + ("; giving up on it" if failures >= 3 else ""))
                return None
            except ModelVerificationError as exc:
                self._handled.add(key)
                self.stats.models_rejected += 1
                self._error(f"model {event.version} rejected: {exc}")
                return None
            self._handled.add(key)
            if self.offer is not None:
                self.offer(folder)
                self.stats.models_offered += 1
                self.offered_versions.append(event.version)
                self._mark("offered", event.version)
                self._log(f"model {event.version} downloaded and verified; offered to the runtime")
            return folder

    def fetch(self, event: ModelAvailable) -> Path:
        """Download and verify a version into ``download_dir/<version>/``; returns that folder."""
        manifest_bytes = self._get_bounded(self._url(event.manifest_url), MAX_MANIFEST_BYTES, "manifest")
        manifest = verify_manifest(manifest_bytes, self.trust_key, expect_version=event.version)
        if manifest.sha256 != event.sha256:
            raise ModelVerificationError(f"model {event.version}: the signed manifest's sha256 differs from the "
                                         "announced one")
        check_manifest_binding(manifest, self.device, self._running_sequence())
        safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in manifest.version).strip(".") or "model"
        partial_dir = self.download_dir / ".partial"
        partial_dir.mkdir(parents=True, exist_ok=True)
        part, etag_file = partial_dir / f"{safe}.onnx", partial_dir / f"{safe}.etag"
        model_url = self._url(event.model_url)
        resumed = self._download(model_url, part, etag_file)
        actual = _sha256_file(part)
        if actual != manifest.sha256 and resumed:  # a corrupt partial file was resumed: start over once
            part.unlink(missing_ok=True)
            etag_file.unlink(missing_ok=True)
            self._download(model_url, part, etag_file)
            actual = _sha256_file(part)
        if actual != manifest.sha256:
            part.unlink(missing_ok=True)
            etag_file.unlink(missing_ok=True)
            raise DownloadCorrupt(f"downloaded model.onnx has sha256 {actual[:12]}..., the signed manifest says "
                                  f"{manifest.sha256[:12]}...")
        self.stats.models_downloaded += 1
        self._mark("downloaded", manifest.version)
        dest = self.download_dir / safe
        tmp = Path(tempfile.mkdtemp(dir=self.download_dir, prefix=f".{safe}."))
        os.replace(part, tmp / "model.onnx")
        atomic_write_bytes(tmp / "manifest.json", manifest_bytes)  # byte for byte: the signature stays valid
        etag_file.unlink(missing_ok=True)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
        fsync_dir(self.download_dir)
        return dest

    def _get_bounded(self, url: str, limit: int, what: str) -> bytes:
        with self._http.stream("GET", url, headers=self._headers) as r:
            self._check_auth(r)
            if r.status_code != 200:
                r.read()
                raise UploadRefused(r.status_code, _error_detail(r))
            data = bytearray()
            for block in r.iter_bytes(1 << 16):
                data += block
                if len(data) > limit:
                    raise ModelVerificationError(f"the {what} is larger than {limit} bytes")
        return bytes(data)

    def _download(self, url: str, part: Path, etag_file: Path) -> bool:
        """GET into ``part``, resuming a previous partial download when the ETag still matches;
        True if it resumed. Never more than ``max_model_bytes`` on disk."""
        have = part.stat().st_size if part.exists() else 0
        etag = etag_file.read_text().strip() if etag_file.exists() else None
        headers = dict(self._headers)
        if have and etag:
            headers["Range"] = f"bytes={have}-"
            headers["If-Range"] = etag
        with self._http.stream("GET", url, headers=headers) as r:
            self._check_auth(r)
            if r.status_code == 416:  # the partial file is already complete (or bogus): start again
                part.unlink(missing_ok=True)
                etag_file.unlink(missing_ok=True)
                r.close()
                return self._download(url, part, etag_file) if have else False
            if r.status_code not in (200, 206):
                raise UploadRefused(r.status_code, r.read().decode("utf-8", "replace")[:200])
            if r.headers.get("etag"):
                atomic_write_text(etag_file, r.headers["etag"])
            resumed = r.status_code == 206
            size = have if resumed else 0
            with open(part, "ab" if resumed else "wb") as fh:
                for block in r.iter_bytes(1 << 16):
                    size += len(block)
                    if size > self.max_model_bytes:
                        fh.close()
                        part.unlink(missing_ok=True)
                        etag_file.unlink(missing_ok=True)
                        raise ModelVerificationError(f"the model is larger than {self.max_model_bytes} bytes")
                    fh.write(block)
        return resumed

    def _url(self, path: str) -> str:
        """A URL of the cloud's own origin: the token is never sent anywhere else."""
        if path.startswith("/") and not path.startswith("//"):
            return f"{self.base_url}{path}"
        base, url = urlsplit(self.base_url), urlsplit(path)
        if (url.scheme, url.netloc) != (base.scheme, base.netloc):
            raise ModelVerificationError(f"refusing to fetch {path[:100]!r}: not on {base.scheme}://{base.netloc}")
        return path

    def _mark(self, what: str, version: str) -> None:
        self.stats.timeline.append({"event": what, "version": version, "t": time.time()})

    def _model_loop(self) -> None:
        backoff = Backoff(self.backoff_initial, self.backoff_max)
        failures = 0
        while not self._stop.is_set():
            if self.stats.token_rejected:
                return
            if failures >= self.sse_failures_before_polling:
                self.stats.mode = "polling"
                try:
                    self.check_for_model()
                except TokenRejected:
                    return
                except (httpx.HTTPError, UploadRefused, OSError) as exc:
                    self._error(f"polling for models failed: {_describe(exc)}")
                if self._stop.wait(self.poll_interval):
                    return
            try:
                self._listen()  # returns when the stream ends
                failures = 0
                backoff.reset()
                delay = backoff.next()
            except TokenRejected:
                return
            except (httpx.HTTPError, UploadRefused, OSError) as exc:
                if self._stop.is_set():
                    return
                failures += 1
                self.stats.sse_failures += 1
                delay = backoff.next()
                self._error(f"event stream failed ({_describe(exc)}); reconnecting in {delay:.1f}s")
            except Exception as exc:  # noqa: BLE001
                if self._stop.is_set():
                    return
                failures += 1
                delay = backoff.next()
                self._error(f"event stream error {type(exc).__name__}: {exc}; reconnecting in {delay:.1f}s")
            if self._stop.wait(delay):
                return

    def _listen(self) -> None:
        timeout = httpx.Timeout(self.timeout, read=max(60.0, self.timeout * 2))
        with self._http.stream("GET", f"{self.base_url}/v1/events",
                               headers={**self._headers, "Accept": "text/event-stream"}, timeout=timeout) as r:
            self._check_auth(r)
            if r.status_code != 200 or not r.headers.get("content-type", "").startswith("text/event-stream"):
                raise UploadRefused(r.status_code, "the event stream is not available")
            self._stream = r
            stream = r.extensions.get("network_stream")
            self._stream_socket = stream.get_extra_info("socket") if stream is not None else None
            if self._stop.is_set():
                return
            self.stats.sse_connects += 1
            self.stats.mode = "sse"
            try:
                for name, data in parse_sse(r.iter_lines()):
                    if self._stop.is_set():
                        return
                    if name == "model_available":
                        try:
                            self.handle_model_available(ModelAvailable.model_validate_json(data))
                        except TokenRejected:
                            raise
                        except (httpx.HTTPError, UploadRefused, OSError) as exc:
                            self._error(f"fetching a model failed ({_describe(exc)}); the next event or poll "
                                        "retries")
                        except ValueError as exc:
                            self._error(f"bad model_available event: {exc}")
            finally:
                self._stream = None
                self._stream_socket = None


class DownloadCorrupt(ModelVerificationError):
    """The downloaded file does not hash to the signed value (a bad line or a bad resume): retried."""


class UploadRefused(Exception):
    """The cloud answered with an error status."""

    def __init__(self, status: int, detail: str):
        super().__init__(f"HTTP {status}: {detail}")
        self.status, self.detail = status, detail


def parse_sse(lines: Iterable[str]) -> Iterable[tuple[str, str]]:
    """(event, data) pairs from server-sent-event lines; comments and retry lines are skipped."""
    event, data = "message", []
    for line in lines:
        if line == "":
            if data:
                yield event, "\n".join(data)
            event, data = "message", []
        elif line.startswith(":"):
            continue
        else:
            field, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if field == "event":
                event = value
            elif field == "data":
                data.append(value)


def _error_detail(r: httpx.Response) -> str:
    try:
        body = r.json()
        return str(body.get("detail") or body)
    except (ValueError, json.JSONDecodeError):
        return r.text[:200]


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def start(runtime: Any, cloud_url: str, token: str | None, *, trust_key: bytes | None = None,
          download_dir: str | os.PathLike | None = None, **options: Any) -> SyncClient:
    """Start syncing a :class:`device.runtime.HeadsetRuntime` (what ``hmd device --cloud`` calls).

    Uploads its journal (``--journal DIR``; read through its own reader, so the writer thread is
    not involved), offers verified models to ``runtime.offer_model``. The trusted key defaults to
    the runtime's ``--trusted-key``; downloads go to ``STORE/downloads`` (``--store``) or a
    temporary folder."""
    cfg = runtime.config
    if not token:
        raise UserError("--cloud needs --token TOKEN (from `hmd cloud add-device NAME`)")
    key = trust_key or getattr(cfg, "public_key", None)
    if not key:
        raise UserError("--cloud needs --trusted-key FILE (the public key `hmd cloud add-device` printed): "
                        "models are verified before they are used")
    if download_dir is None:
        download_dir = (Path(cfg.store_dir) / "downloads") if getattr(cfg, "store_dir", None) else \
            Path(tempfile.mkdtemp(prefix="hmd-sync-"))
    journal = None
    if getattr(cfg, "journal_dir", None):
        from device.journal import Journal

        journal = Journal(cfg.journal_dir)
    models = runtime.models
    client = SyncClient(cloud_url, token, trust_key=key, download_dir=download_dir, journal=journal,
                        offer=runtime.offer_model, current_version=lambda: runtime.model_version,
                        running_sequence=lambda: models.active.manifest.sequence, known_bad=models.is_bad,
                        health=runtime.health, **options)
    return client.start()
