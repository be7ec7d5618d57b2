"""Third-party noise is filtered in the suite and the CLI; our own warnings never are."""

import logging
import warnings

from lightning_prune._quiet import quiet_third_party

LEAFSPEC = ("`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec) and"
            " treespec.is_leaf()` instead.")


def _action(message: str, category: type[Warning], module: str) -> str:
    """What the active filters (pyproject's filterwarnings during a test) do with a warning."""
    for action, msg, cat, mod, _ in warnings.filters:
        if ((msg is None or msg.match(message)) and issubclass(category, cat)
                and (mod is None or mod.match(module))):
            return action
    return warnings.defaultaction


def test_the_suite_ignores_third_party_noise_and_shows_our_warnings():
    assert _action("x is deprecated", DeprecationWarning, "torch.nn.modules") == "ignore"
    assert _action(LEAFSPEC, FutureWarning, "lightning.pytorch.utilities._pytree") == "ignore"
    assert _action("x is deprecated", DeprecationWarning, "lightning_prune.callbacks.schedules") != "ignore"
    assert _action("x is deprecated", DeprecationWarning, "tests.test_quiet") != "ignore"
    assert _action("`every_n_epochs`=5 is step 9", UserWarning,
                   "lightning_prune.callbacks.schedules") != "ignore"
    assert _action("another FutureWarning", FutureWarning, "torch.utils._pytree") != "ignore"


def test_the_litlogger_tip_is_dropped_and_other_lightning_lines_are_kept(caplog):
    quiet_third_party()
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    with caplog.at_level(logging.INFO, logger=logger.name):
        logger.info("💡 Tip: For seamless cloud logging, try installing [litlogger](...)")
        logger.info("GPU available: False, used: False")
    assert [r.getMessage() for r in caplog.records] == ["GPU available: False, used: False"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_third_party()
        warnings.warn_explicit(LEAFSPEC, FutureWarning, "_pytree.py", 21, module="lightning.pytorch")
        warnings.warn_explicit("ours", UserWarning, "schedules.py", 1,
                               module="lightning_prune.callbacks.schedules")
    assert [str(w.message) for w in caught] == ["ours"]
