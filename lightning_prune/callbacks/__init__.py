"""The built-in pruning callbacks, one module each; every one is registered through the
``lightning_prune.callbacks`` entry-point group in the project's ``pyproject.toml``."""
