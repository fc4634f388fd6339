"""The headset runtime: capture, ONNX Runtime inference, overlay, model store with hot-swap and
rollback, and the opt-in data journal. numpy, OpenCV and onnxruntime only: never torch or models/.
"""
from device.capture import CaptureThread, Frame, FrameSource, open_source
from device.engine import InferenceEngine, ModelRejected, Prediction, load_model
from device.hotswap import ModelManager, SwapEvent, SwapTicket
from device.journal import Journal, JournalBatch, JournalSampler
from device.runtime import HeadsetRuntime, RuntimeConfig
from device.store import ModelStore

__all__ = ["CaptureThread", "Frame", "FrameSource", "open_source", "InferenceEngine", "ModelRejected",
           "Prediction", "load_model", "ModelManager", "SwapEvent", "SwapTicket", "Journal", "JournalBatch",
           "JournalSampler", "HeadsetRuntime", "RuntimeConfig", "ModelStore"]
