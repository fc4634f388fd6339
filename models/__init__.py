"""The learning core: networks, GREAT (multi-task, defence, distillation), baselines,
attacks, data sources and task targets, the training engine, ONNX export.

Imports nothing from device/ or cloud/. Where things are (lower layers first; no module
imports one above it, ``tests/test_import_cycles.py`` checks):

* names -> classes: ``registry`` (architectures, task sets, weightings, defences, distillers);
* small utilities: ``schedules`` (poly lr, ramps), ``gradients`` (scaling, reversal,
  per-sample normalisation), ``metrics`` (progress meters), ``batchnorm``, ``own_optimizers``;
* networks and data: ``network``, ``classifier`` (resnet / cnn5), ``input_gradients`` (their
  explicit input gradient), ``data``, ``labelled``, ``checkpoints``;
* methods: ``weighting`` + ``weighting_great``, ``defence``, ``distill``, ``attacks``;
* training: ``engine`` (the one loop), ``train`` (multi-task), ``train_classifier`` (defend,
  distill), ``personalise``; evaluation and export: ``robustness``, ``export``, ``export_run``;
* commands (parse, call, print): ``cli_*``; benchmarks: ``bench``, ``bench_robust``, ``table4``,
  ``tables_robust``.
"""
