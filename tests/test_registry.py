from importlib.metadata import EntryPoint

import pytest
from lightning.pytorch.callbacks import Callback

import lightning_prune as lp
from lightning_prune import _registry

BUILTINS = {"magnitude"}


@pytest.fixture
def fake_entry_points(monkeypatch):
    def install(extra):
        real = _registry._entry_points()
        eps = {**real, **{name: EntryPoint(name, value, _registry.ENTRY_POINT_GROUP)
                          for name, value in extra.items()}}
        monkeypatch.setattr(_registry, "_entry_points", lambda: eps)
        _registry._reset_cache()
    yield install
    _registry._reset_cache()


def test_builtins_are_registered_through_entry_points():
    infos = lp.list_callbacks()
    assert BUILTINS <= set(infos)
    info = infos["magnitude"]
    assert info.object_path == "lightning_prune.callbacks.magnitude:GradualMagnitudePruning"
    assert info.distribution == "lightning-prune" and info.version == lp.__version__
    assert not info.broken and info.summary.startswith("Gradual magnitude pruning")
    assert lp.get_callback("magnitude") is lp.GradualMagnitudePruning
    cb = lp.create_callback("magnitude", target_sparsity=0.75)
    assert isinstance(cb, Callback) and cb.target_sparsity == 0.75


def test_filter():
    assert list(lp.list_callbacks(filter="magn")) == ["magnitude"]
    assert list(lp.list_callbacks(filter="mag*")) == ["magnitude"]
    assert lp.list_callbacks(filter="zzz") == {}


def test_unknown_name_lists_the_names_that_exist():
    with pytest.raises(KeyError, match="No pruning callback named 'nope'. Registered callbacks: .*magnitude"):
        lp.get_callback("nope")


def test_broken_plugin_is_listed_with_its_error_and_breaks_nothing(fake_entry_points):
    fake_entry_points({"broken": "no_such_module_xyz:Thing", "notacallback": "collections:OrderedDict"})
    infos = lp.list_callbacks()
    assert infos["broken"].broken and "No module named 'no_such_module_xyz'" in infos["broken"].error
    assert infos["notacallback"].broken and "not a subclass" in infos["notacallback"].error
    assert not infos["magnitude"].broken
    with pytest.raises(ImportError, match="no_such_module_xyz"):
        lp.get_callback("broken")
    assert lp.create_callback("magnitude") is not None


def test_discovery_is_lazy(fake_entry_points, monkeypatch):
    loaded = []
    original = EntryPoint.load
    monkeypatch.setattr(EntryPoint, "load", lambda self: loaded.append(self.name) or original(self))
    fake_entry_points({"broken": "no_such_module_xyz:Thing"})
    lp.get_callback("magnitude")
    assert loaded == ["magnitude"]  # the broken plugin was never imported
