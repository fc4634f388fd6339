"""The learning core: networks, GREAT (multi-task, defence, distillation), baselines,
attacks, data sources and task targets, the training loop, ONNX export.

Imports nothing from device/ or cloud/.
"""
