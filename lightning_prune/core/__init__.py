"""The Lightning-free core: what works on a plain ``nn.Module`` (targets, masks, channel gates, compression,
reparameterisation, reports, 2:4 weights, the sensitivity scan). Nothing here imports Lightning, the
callbacks, deployment, training or the CLI (``tests/test_layering.py``); see ``docs/architecture.md``."""
