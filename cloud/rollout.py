"""Staged rollout of fleet-wide base versions: canary, health, automatic halt, promotion.

``hmd cloud release VERSION --canary 10%`` gives a base version (registered with
``hmd cloud import-base --staged``) to a stable tenth of the devices: a device is in when the
hash of (release, device name) falls below the percentage, so widening keeps the devices already
in. Headsets report health (``POST /v1/health``: frames, FPS, latency, rollbacks, inference
errors); after each report from a canary device the release is checked against its thresholds
and, when one is crossed, halted: the canary devices go back to the previous base, re-signed
under a new name with a newer sequence (headsets refuse an older signed sequence), and are told
so over their event streams. ``--promote`` makes it every device's base. Personalised versions
stay on top: a device keeps its personalised model while it runs the base it was trained from,
and its next job personalises the base it is on now.
"""
from __future__ import annotations

import logging
import time
from typing import Any

from cloud.registry import ModelRegistry, model_info
from cloud.storage import Release, Storage, Version, in_canary
from shared.errors import UserError
from shared.wire import ModelAvailable

log = logging.getLogger("hmd.cloud.rollout")
MIN_FRAMES_FOR_ERROR_RATE = 100  # fewer canary frames than this say nothing about an error rate
MIN_REPORTS_FOR_FPS = 3  # reports on each side before FPS is compared


def parse_percent(text: str) -> float:
    try:
        value = float(text.strip().rstrip("%"))
    except ValueError:
        raise UserError(f"--canary {text!r}: expected a percentage such as 10%") from None
    if not 0.0 < value <= 100.0:
        raise UserError(f"--canary {text!r}: between 0% (exclusive) and 100%")
    return value


def begin_staging(storage: Storage) -> None:
    """Before the first staged base is registered: record the base that is stable now as a
    promoted release, so that a newer base reaches no device until it is released."""
    stable = storage.base_version()
    if stable is not None and not storage.releases():
        storage.add_release(Release(stable.version, None, 100.0, "promoted", stable.created, stable.created,
                                    "the stable base when staging began", 0.0, 0, 0.0))


def stage(storage: Storage, version: str, percent: float, *, max_error_rate: float = 0.01, max_rollbacks: int = 0,
          min_fps_ratio: float = 0.8) -> Release:
    """Start (or widen) the canary of base ``version``."""
    v = storage.version(version)
    if v is None or v.device_id is not None:
        raise UserError(f"{version} is not a registered base version (hmd cloud import-base RUN --version "
                        f"{version} --staged)")
    existing = storage.release(version)
    if existing is not None:
        if existing.state != "canary":
            raise UserError(f"release {version} is {existing.state}; stage a new base version instead")
        if percent < existing.percent:
            raise UserError(f"release {version} is at {existing.percent:g}% already; a canary only widens "
                            "(halt it to take it back)")
        storage.update_release(version, percent=percent)
        return storage.release(version)  # type: ignore[return-value]
    active = [r for r in storage.releases() if r.state in ("canary", "halting")]
    if active:
        raise UserError(f"release {active[0].version} is still a canary: promote or halt it first")
    stable = storage.base_version()
    if stable is not None and stable.version == version:
        raise UserError(f"{version} is the stable base already")
    now = time.time()
    release = Release(version, stable.version if stable else None, percent, "canary", now, now, None,
                      max_error_rate, max_rollbacks, min_fps_ratio)
    storage.add_release(release)
    return release


def promote(storage: Storage, version: str) -> Release:
    release = storage.release(version)
    if release is None:
        stage(storage, version, 100.0)
    elif release.state != "canary":
        raise UserError(f"release {version} is {release.state}: only a canary is promoted")
    storage.update_release(version, state="promoted", percent=100.0)
    return storage.release(version)  # type: ignore[return-value]


def halt(storage: Storage, registry: ModelRegistry, version: str, reason: str) -> Release | None:
    """Stop a canary and put its devices back on the previous base (re-signed, so headsets accept
    the step back). Returns the halted release, or None if it was not a canary (another process
    halted it first, or it was promoted)."""
    if not storage.update_release(version, only_if_state="canary", state="halting", reason=reason):
        return None
    release = storage.release(version)
    rollback = None
    if release is not None and release.previous:
        previous = storage.version(release.previous)
        if previous is not None:
            rollback = resign_base(storage, registry, previous, f"{previous.version}-rollback-{int(time.time())}")
    storage.update_release(version, state="halted", rollback_version=rollback.version if rollback else None)
    log.warning("release %s halted: %s (canary devices back on %s)", version, reason,
                rollback.version if rollback else "nothing")
    return storage.release(version)


def resign_base(storage: Storage, registry: ModelRegistry, base: Version, name: str) -> Version:
    """The same model under a new name and a newer signed sequence."""
    manifest = registry.manifest(base).model_copy(update={"version": name, "parent_version": base.version})
    signed = registry.sign(manifest, None)
    manifest_sha = registry.blobs.put_bytes(signed.to_json().encode("utf-8"))
    v = Version(name, None, base.version, base.onnx_sha256, manifest_sha, base.bytes, base.run_dir, None, time.time())
    storage.add_version(v)
    return v


def check(storage: Storage, release: Release) -> str | None:
    """Why the canary must halt, or None."""
    canary = storage.health_summary([release.version])
    if canary["rollbacks"] > release.max_rollbacks:
        return f"{canary['rollbacks']} headset rollbacks of {release.version} (limit {release.max_rollbacks})"
    if canary["frames"] >= MIN_FRAMES_FOR_ERROR_RATE:
        rate = canary["errors"] / canary["frames"]
        if rate > release.max_error_rate:
            return f"inference error rate {rate:.3f} over {canary['frames']} frames (limit {release.max_error_rate:g})"
    if release.previous and release.min_fps_ratio > 0:
        stable = storage.health_summary([release.previous])
        if canary["reports"] >= MIN_REPORTS_FOR_FPS and stable["reports"] >= MIN_REPORTS_FOR_FPS and stable["fps"] > 0:
            ratio = canary["fps"] / stable["fps"]
            if ratio < release.min_fps_ratio:
                return (f"canary FPS {canary['fps']:.1f} is {ratio:.2f}x the stable base's {stable['fps']:.1f} "
                        f"(limit {release.min_fps_ratio:g}x)")
    return None


def after_health_report(storage: Storage, registry: ModelRegistry, version: str) -> Release | None:
    """Check the canary a report was about; halts it when a threshold is crossed (the halted
    release, else None)."""
    release = storage.release(version)
    if release is None or release.state != "canary":
        return None
    reason = check(storage, release)
    return halt(storage, registry, version, reason) if reason else None


def notify_devices(storage: Storage, publish: Any, release: Release) -> int:
    """Tell every device of a release's bucket its current model (after a stage, halt or
    promotion); returns how many were told."""
    n = 0
    for device in storage.devices():  # type: ignore[attr-defined]
        if release.state == "promoted" or in_canary(release, device.name):
            v = storage.current_version(device.id)
            if v is not None:
                info = model_info(v)
                publish(device.id, "model_available", ModelAvailable(
                    version=info.version, sha256=info.sha256, parent_version=info.parent_version,
                    manifest_url=info.manifest_url, model_url=info.model_url).model_dump())
                n += 1
    return n
