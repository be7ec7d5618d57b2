"""``python -m lightning_prune.cli ...``: the ``lightning-prune`` command."""

from lightning_prune.cli.app import main

if __name__ == "__main__":
    main()
