"""The training kit: :class:`~lightning_prune.training.models.ImageClassifier` (any timm model),
the ReduceNet-style timm models (:mod:`~lightning_prune.training.reducenet`) and the data modules
(:mod:`~lightning_prune.training.data`)."""
