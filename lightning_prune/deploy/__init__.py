"""Deployment: ONNX export checked in onnxruntime (:mod:`~lightning_prune.deploy.onnx`), sparse checkpoints
(:mod:`~lightning_prune.deploy.sparse_io`) and a model rebuilt from a run's checkpoint with its callbacks'
state (:mod:`~lightning_prune.deploy.restore`)."""
