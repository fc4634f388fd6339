"""ONNX Runtime inference for one verified model: preprocessing per manifest, warm-up, outputs.

Session options, chosen by measurement (``python -m device.engine MODEL.onnx`` prints the
table; 128x128 MultiTaskNet, 2 shared CPU cores, batch 1, median of 60 runs, 2025-11):

    level      threads  fp32 ms  int8 ms   load fp32/int8 ms
    BASIC      1        22.0     20.7      8 / 16
    EXTENDED   1        18.3     12.2      6 / 26
    ALL        1        10.4     15.2      8 / 22
    ALL        2         7.3     22.7      9 / 33
    cached optimised model, optimisation off: load 4.2 / 5.2 ms, run 11.2 / 10.5 ms

    (int8 above: the former fully quantised graph.) The current INT8 export (space-to-depth
    decoder stages, models/int8_graph.py), interleaved round-robin with FP32, same options,
    2026-11, load avg ~1.3: ALL 2 threads 5.4-6.1 ms vs FP32 9.4-10.1 ms; EXTENDED within
    noise of ALL for INT8 (0-7 % faster), much slower for FP32 -> one set of options for both.

    thread-pool spinning, ALL, fp32, interleaved A/B with other jobs on the cores (load avg 6):
    2 threads spinning 52.4 ms, 2 threads not spinning 28.8 ms, 1 thread not spinning 27.4 ms

So: ``ORT_ENABLE_ALL`` (layout-specific NCHWc fusions are where most of the fp32 gain is),
one inter-op thread, sequential execution, intra-op threads = min(2, cores) by default
(``--threads``), and no spinning: a spinning pool starves the capture, overlay and journal
threads that share a headset's few cores (and is 1.8x slower when anything else runs).
The optimised graph is cached per (model sha256, onnxruntime version) when a cache folder
is given, which halves to quarters the load time of a hot-swap.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort

from shared.atomic import atomic_write_text
from shared.errors import UserError
from shared.hashing import verify as verify_signature
from shared.manifest import Manifest, manifest_path_for


class ModelRejected(UserError):
    """A model failed verification: wrong hash or signature, wrong inputs/outputs, NaN on the probe."""


def default_threads() -> int:
    return max(1, min(2, os.cpu_count() or 1))


def session_options(threads: int | None = None, optimise: bool = True,
                    optimised_path: str | None = None) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = threads or default_threads()
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimise
                                   else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    if optimised_path:
        so.optimized_model_filepath = optimised_path
    return so


@dataclasses.dataclass
class Prediction:
    """One frame's outputs, as the overlay uses them (model resolution, float32 in [0, 1]; a room
    model's depth in metres, unit normals H x W x 3, keypoint heatmaps K x H x W)."""

    class_index: int
    confidence: float
    class_name: str
    colour: np.ndarray | None  # H x W x 3 RGB
    edges: np.ndarray | None  # H x W
    denoised: np.ndarray | None  # H x W
    version: str
    depth: np.ndarray | None = None  # H x W metres (room models)
    normals: np.ndarray | None = None  # H x W x 3 camera frame
    keypoints: np.ndarray | None = None  # K x H x W heatmaps
    task_set: str = "cifar"

    def summary(self) -> dict:
        out = {"class": self.class_name, "confidence": round(self.confidence, 4)}
        if self.edges is not None:
            out["edge_fraction"] = round(float((self.edges > 0.5).mean()), 4)
        if self.denoised is not None:
            out["denoised_mean"] = round(float(self.denoised.mean()), 4)
        if self.depth is not None:
            out["depth_median_m"] = round(float(np.median(self.depth)), 3)
        return out


def resolve_model_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    """A model is FILE.onnx (manifest beside it) or a folder with model.onnx + manifest.json."""
    path = Path(path)
    if path.is_dir():
        manifest = path / "manifest.json"
        onnx_files = sorted(path.glob("*.onnx"))
        if manifest.is_file():
            try:
                name = Manifest.load(manifest).onnx_file
            except UserError:
                name = "model.onnx"
            candidate = path / name if (path / name).is_file() else path / "model.onnx"
            return candidate, manifest
        if len(onnx_files) == 1:
            return onnx_files[0], manifest_path_for(onnx_files[0])
        raise UserError(f"model folder {path} has no manifest.json")
    return path, manifest_path_for(path)


class InferenceEngine:
    """One ONNX Runtime session for one verified model. Build with :func:`load_model`."""

    def __init__(self, session: ort.InferenceSession, manifest: Manifest, onnx_path: Path, load_ms: float):
        self.session, self.manifest, self.onnx_path, self.load_ms = session, manifest, onnx_path, load_ms
        spec = manifest.input
        self.version = manifest.version
        self.input_name = spec.name
        self.input_hw = (spec.height, spec.width)
        self._buf = np.empty((1, spec.channels, spec.height, spec.width), np.float32)
        self._scale = np.float32(spec.scale)
        self._noise = spec.noise if spec.noise.apply_at_inference else None
        self._rng = np.random.default_rng(0)
        self.output_names = [o.name for o in manifest.outputs]
        self._tasks = {o.task: i for i, o in enumerate(manifest.outputs)}
        self._class_names = list(manifest.class_names)
        self.task_set = manifest.task_set or "cifar"

    # -- the three stages ---------------------------------------------------------------
    def preprocess(self, rgb: np.ndarray) -> np.ndarray:
        """RGB uint8 -> 1 x C x H x W float32, exactly as the manifest says (vectorised, no copies
        beyond OpenCV's): gray (BT.601) first because resizing one channel is 3x cheaper."""
        h, w = self.input_hw
        if self._buf.shape[1] == 1:
            img = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
            if img.shape != (h, w):
                interp = cv2.INTER_AREA if img.shape[0] > h else cv2.INTER_LINEAR
                img = cv2.resize(img, (w, h), interpolation=interp)
            np.multiply(img, self._scale, out=self._buf[0, 0], casting="unsafe")
        else:
            img = cv2.resize(rgb, (w, h), interpolation=cv2.INTER_AREA)
            np.multiply(img.transpose(2, 0, 1), self._scale, out=self._buf[0], casting="unsafe")
        if self._noise is not None:  # only when the manifest asks for it at inference
            x = self._buf
            x += x * self._rng.normal(0, self._noise.speckle, x.shape).astype(np.float32)
            u = self._rng.random(x.shape)
            x[u < self._noise.salt_pepper / 2] = 0.0
            x[u > 1 - self._noise.salt_pepper / 2] = 1.0
            np.clip(x, 0, 1, out=x)
        return self._buf

    def infer(self, x: np.ndarray) -> list[np.ndarray]:
        return self.session.run(self.output_names, {self.input_name: x})

    def interpret(self, outputs: list[np.ndarray]) -> Prediction:
        """Raw outputs -> :class:`Prediction`; raises ``FloatingPointError`` on NaN/inf."""
        for o in outputs:
            if not np.isfinite(o).all():
                raise FloatingPointError(f"model {self.version} produced non-finite outputs")
        idx = self._tasks.get("class")
        if idx is not None:
            logits = outputs[idx].reshape(-1).astype(np.float64)
            p = np.exp(logits - logits.max())
            p /= p.sum()
            k = int(p.argmax())
            cls, conf = k, float(p[k])
            name = self._class_names[k] if k < len(self._class_names) else str(k)
        else:
            cls, conf, name = -1, 0.0, "-"

        def image(task: str) -> np.ndarray | None:
            i = self._tasks.get(task)
            if i is None:
                return None
            a = outputs[i][0]
            return a.transpose(1, 2, 0) if a.shape[0] == 3 else a[0]

        heatmaps = self._tasks.get("keypoints")
        return Prediction(cls, conf, name, image("colour"), image("edges"), image("denoised"), self.version,
                          depth=image("depth"), normals=image("normals"),
                          keypoints=None if heatmaps is None else outputs[heatmaps][0], task_set=self.task_set)

    def predict(self, rgb: np.ndarray) -> Prediction:
        return self.interpret(self.infer(self.preprocess(rgb)))

    def warm_up(self, runs: int = 3) -> None:
        x = probe_frame(*self.input_hw, self._buf.shape[1])
        for _ in range(runs):
            self.infer(x)

    def info(self) -> dict:
        return {"version": self.version, "precision": self.manifest.precision, "path": str(self.onnx_path),
                "input": [self.input_hw[0], self.input_hw[1]], "load_ms": round(self.load_ms, 1)}


def probe_frame(h: int, w: int, c: int = 1) -> np.ndarray:
    """A deterministic probe: a diagonal gradient with a bright square, 1 x C x H x W in [0, 1]."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = (xx / max(w - 1, 1) + yy / max(h - 1, 1)) / 2
    img[h // 4: h // 2, w // 4: w // 2] = 0.9
    return np.ascontiguousarray(np.broadcast_to(img, (1, c, h, w)), dtype=np.float32)


def _dims_match(declared: list[int], actual: list) -> bool:
    if len(declared) != len(actual):
        return False
    return all(not isinstance(a, int) or a <= 0 or a == d for d, a in zip(declared, actual))


def _read_checked_cache(cached: Path) -> bytes | None:
    """The cached optimised graph, if its sha256 matches the one recorded when it was written
    (a corrupt or replaced cache file is ignored and made again)."""
    try:
        data = cached.read_bytes()
        expected = cached.with_name(cached.name + ".sha256").read_text().strip()
    except OSError:
        return None
    return data if hashlib.sha256(data).hexdigest() == expected else None


def _commit_cache(tmp: Path, cached: Path) -> None:
    """Record the new cache file's sha256, then rename it into place (atomically: never half-written)."""
    atomic_write_text(cached.with_name(cached.name + ".sha256"), hashlib.sha256(tmp.read_bytes()).hexdigest() + "\n")
    os.replace(tmp, cached)


def load_model(path: str | os.PathLike, *, manifest_path: str | os.PathLike | None = None,
               public_key: bytes | None = None, threads: int | None = None,
               cache_dir: str | os.PathLike | None = None, warm_runs: int = 3) -> InferenceEngine:
    """Verify and load a model; raise :class:`ModelRejected` (a UserError, one line) if it is unfit.

    Checks, in order: files exist; manifest valid; ONNX sha256 equals the manifest's; the
    manifest's Ed25519 signature (only when ``public_key`` is given: then it is required); the
    session's inputs and outputs are the declared ones; outputs on a probe frame have the
    declared shapes and are finite. Then warms the session up.
    """
    onnx_path, default_manifest = resolve_model_paths(path)
    manifest_path = Path(manifest_path) if manifest_path else default_manifest
    if not onnx_path.is_file():
        raise ModelRejected(f"model file not found: {onnx_path}")
    if not manifest_path.is_file():
        raise ModelRejected(f"no manifest for {onnx_path} (expected {manifest_path})")
    try:
        manifest = Manifest.load(manifest_path)
    except UserError as exc:
        raise ModelRejected(str(exc)) from None
    # read once: the bytes that are hashed are the bytes that are loaded (the file is never reopened)
    model_bytes = onnx_path.read_bytes()
    actual = hashlib.sha256(model_bytes).hexdigest()
    if actual != manifest.sha256:
        raise ModelRejected(f"model file {onnx_path} does not match its manifest (sha256 {actual[:12]}... != "
                            f"{manifest.sha256[:12]}...)")
    if public_key is not None:
        if not manifest.signature:
            raise ModelRejected(f"model {manifest.version} is not signed and a trusted key is configured")
        if not verify_signature(public_key, manifest.canonical_bytes(), manifest.signature):
            raise ModelRejected(f"model {manifest.version}: manifest signature does not verify with the trusted key")

    t0 = time.perf_counter()
    cached = None
    if cache_dir is not None:
        cached = Path(cache_dir) / f"{manifest.sha256[:32]}-ort{ort.__version__}.onnx"
    try:
        cached_bytes = _read_checked_cache(cached) if cached is not None else None
        if cached_bytes is not None:
            session = ort.InferenceSession(cached_bytes, session_options(threads, optimise=False),
                                           providers=["CPUExecutionProvider"])
        else:
            opt_path = None
            if cached is not None:
                cached.parent.mkdir(parents=True, exist_ok=True)
                opt_path = str(cached.with_name(f".{cached.name}.{os.getpid()}.tmp"))
            session = ort.InferenceSession(model_bytes, session_options(threads, optimised_path=opt_path),
                                           providers=["CPUExecutionProvider"])
            if opt_path and os.path.exists(opt_path):
                _commit_cache(Path(opt_path), cached)
    except Exception as exc:  # onnxruntime raises its own exception types for corrupt graphs
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelRejected(f"model {onnx_path} could not be loaded by ONNX Runtime: {msg[:200]}") from None
    load_ms = (time.perf_counter() - t0) * 1000

    spec = manifest.input
    inputs = session.get_inputs()
    if len(inputs) != 1 or inputs[0].name != spec.name or not _dims_match(
            [1, spec.channels, spec.height, spec.width], list(inputs[0].shape)):
        got = ", ".join(f"{i.name}{list(i.shape)}" for i in inputs)
        raise ModelRejected(f"model {manifest.version}: input is {got}, the manifest declares "
                            f"{spec.name}[1, {spec.channels}, {spec.height}, {spec.width}]")
    actual_outputs = {o.name: o for o in session.get_outputs()}
    for out in manifest.outputs:
        o = actual_outputs.get(out.name)
        if o is None:
            raise ModelRejected(f"model {manifest.version}: output {out.name!r} declared in the manifest "
                                f"is not in the graph (graph has {', '.join(actual_outputs)})")
        if not _dims_match(out.shape, list(o.shape)):
            raise ModelRejected(f"model {manifest.version}: output {out.name} has shape {list(o.shape)}, "
                                f"the manifest declares {out.shape}")
    engine = InferenceEngine(session, manifest, onnx_path, load_ms)
    try:
        outs = engine.infer(probe_frame(spec.height, spec.width, spec.channels))
    except Exception as exc:
        raise ModelRejected(f"model {manifest.version} failed on a probe frame: {str(exc).splitlines()[0][:200]}") from None
    for out, value in zip(manifest.outputs, outs):
        if list(value.shape) != list(out.shape):
            raise ModelRejected(f"model {manifest.version}: output {out.name} has shape {list(value.shape)} "
                                f"on a probe frame, the manifest declares {out.shape}")
        if not np.isfinite(value).all():
            raise ModelRejected(f"model {manifest.version}: output {out.name} is not finite (NaN/inf) on a probe frame")
    engine.warm_up(warm_runs)
    return engine


def _measure(path: str) -> None:  # pragma: no cover - the table in the module docstring
    x = None
    levels = {"BASIC": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "EXTENDED": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "ALL": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    for name, level in levels.items():
        for threads in (1, 2):
            so = session_options(threads)
            so.graph_optimization_level = level
            t0 = time.perf_counter()
            s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
            load = (time.perf_counter() - t0) * 1000
            i = s.get_inputs()[0]
            x = probe_frame(*i.shape[2:4], i.shape[1])
            for _ in range(5):
                s.run(None, {i.name: x})
            ts = []
            for _ in range(60):
                t0 = time.perf_counter()
                s.run(None, {i.name: x})
                ts.append((time.perf_counter() - t0) * 1000)
            print(f"{name:9s} threads={threads} load={load:6.1f} ms median={np.median(ts):6.2f} ms "
                  f"p95={np.percentile(ts, 95):6.2f} ms")


if __name__ == "__main__":  # pragma: no cover
    _measure(sys.argv[1])
