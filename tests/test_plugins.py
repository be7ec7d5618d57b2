"""Third-party plugins: the installed lightning-prune-baselines distribution, broken and uninstalled plugins.

CI installs the plugin (``pip install --no-deps --editable plugins/lightning-prune-baselines``, see the
Makefile's ``setup``) before running these tests; nothing in lightning-prune names its callbacks.
"""

import os
import re
import subprocess
import sys
import textwrap
import types
from importlib.metadata import EntryPoint, version
from pathlib import Path

import pytest

import lightning_prune as lp
from lightning_prune import _registry
from lightning_prune._autoload import callbacks_from_env
from lightning_prune.callbacks.base import PruningCallback
from lightning_prune.cli import format_callback_list, main
from lightning_prune.testing import check_callback_conformance, fit_tiny

PLUGIN = "lightning-prune-baselines"
PLUGIN_CALLBACKS = {
    "first_k": "lightning_prune_baselines.first_k:FirstKChannels",
    "random_channels": "lightning_prune_baselines.random_channels:RandomChannels",
    "random_unstructured": "lightning_prune_baselines.random_unstructured:RandomUnstructured",
}
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _fresh_registry():
    _registry._reset_cache()
    yield
    _registry._reset_cache()


def _row(listing: str, name: str) -> str:
    rows = [line for line in listing.splitlines() if line.split() and line.split()[0] == name]
    assert len(rows) == 1, f"no single row for {name!r} in:\n{listing}"
    return rows[0]


def test_installed_plugin_is_listed_with_its_distribution_and_version():
    infos = lp.list_callbacks()
    plugin_version = version(PLUGIN)
    for name, object_path in PLUGIN_CALLBACKS.items():
        info = infos[name]
        assert (info.object_path, info.distribution, info.version) == (object_path, PLUGIN, plugin_version)
        assert not info.broken and info.summary, name
    assert infos["first_k"].summary.startswith("Drop the first k units of every channel group")
    assert infos["magnitude"].distribution == "lightning-prune"  # the built-ins are registered the same way
    cb = lp.create_callback("first_k", target_sparsity=0.25, prune_epoch=2)
    assert isinstance(cb, PruningCallback)
    assert (cb.target_sparsity, cb.prune_epoch, cb.prune_step) == (0.25, 2, None)
    assert type(cb).__module__ == "lightning_prune_baselines.first_k"


def test_plugin_callback_created_by_name_trains(tmp_path):
    cb = lp.create_callback("random_unstructured", target_sparsity=0.5, verbose=False)
    fit_tiny([cb], tmp_path, max_epochs=1, limit_train_batches=2, limit_val_batches=0)
    assert cb.sparsity_metrics()["prune/sparsity"] == pytest.approx(0.5, abs=0.01)


def test_cli_list_shows_the_plugin_with_distribution_version_and_status(capsys):
    main(["list"])
    listing = capsys.readouterr().out
    assert listing == format_callback_list() + "\n"
    header = listing.splitlines()[0].split()
    assert header == ["name", "class", "distribution", "version", "status", "summary"]
    for name, object_path in PLUGIN_CALLBACKS.items():
        assert _row(listing, name).split()[:5] == [name, object_path, PLUGIN, version(PLUGIN), "ok"]


def test_uninstalled_plugin_is_gone(monkeypatch):
    real = _registry._entry_points()
    assert set(PLUGIN_CALLBACKS) <= set(real)
    without = {name: ep for name, ep in real.items() if ep.dist is None or ep.dist.metadata["Name"] != PLUGIN}
    monkeypatch.setattr(_registry, "_entry_points", lambda: without)
    _registry._reset_cache()
    assert not set(PLUGIN_CALLBACKS) & set(lp.list_callbacks())
    assert "first_k" not in format_callback_list()
    with pytest.raises(
        KeyError, match=r"No pruning callback named 'first_k'. Registered callbacks: .*magnitude"
    ):
        lp.create_callback("first_k")
    assert isinstance(lp.create_callback("magnitude"), PruningCallback)


def test_broken_fake_entry_point_is_listed_broken_and_the_rest_keep_working(monkeypatch, capsys):
    real = _registry._entry_points()
    broken = EntryPoint(
        "zz_broken", "lightning_prune_no_such_plugin.algo:Pruner", _registry.ENTRY_POINT_GROUP
    )
    monkeypatch.setattr(_registry, "_entry_points", lambda: {**real, "zz_broken": broken})
    _registry._reset_cache()
    info = lp.list_callbacks()["zz_broken"]
    assert info.broken and "No module named 'lightning_prune_no_such_plugin'" in info.error
    main(["list"])
    row = _row(capsys.readouterr().out, "zz_broken")
    assert "BROKEN" in row and "ModuleNotFoundError: No module named 'lightning_prune_no_such_plugin'" in row
    with pytest.raises(ImportError, match="lightning_prune_no_such_plugin"):
        lp.create_callback("zz_broken")
    assert not lp.list_callbacks()["first_k"].broken
    assert lp.create_callback("first_k").target_sparsity == 0.5


def _broken_distribution(root: Path) -> Path:
    """A site directory holding one installed distribution whose first entry point fails to import.

    ``.dist-info`` with ``METADATA`` and ``entry_points.txt`` is all ``importlib.metadata`` reads, so this is
    what ``pip install --target root`` would leave, without pip.
    """
    site = root / "site"
    (site / "broken_prune_plugin").mkdir(parents=True)
    (site / "broken_prune_plugin" / "__init__.py").write_text("")
    (site / "broken_prune_plugin" / "bad.py").write_text("raise RuntimeError('deliberately broken plugin')\n")
    (site / "broken_prune_plugin" / "good.py").write_text(
        textwrap.dedent('''
        from lightning.pytorch.callbacks import Callback

        class Good(Callback):
            """A working callback shipped beside the broken one."""
    ''')
    )
    info = site / "broken_prune_plugin-0.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-prune-plugin\nVersion: 0.3\n")
    (info / "entry_points.txt").write_text(
        "[lightning_prune.callbacks]\n"
        "zz_bad = broken_prune_plugin.bad:Bad\n"
        "zz_good = broken_prune_plugin.good:Good\n"
    )
    return site


def test_real_broken_distribution_on_sys_path(tmp_path, monkeypatch):
    site = _broken_distribution(tmp_path)
    monkeypatch.syspath_prepend(str(site))
    _registry._reset_cache()
    infos = lp.list_callbacks()
    bad, good = infos["zz_bad"], infos["zz_good"]
    assert (bad.distribution, bad.version, good.distribution, good.version) == (
        "broken-prune-plugin",
        "0.3",
        "broken-prune-plugin",
        "0.3",
    )
    assert bad.broken and "RuntimeError: deliberately broken plugin" in bad.error
    assert not good.broken and good.summary == "A working callback shipped beside the broken one."
    assert not any(infos[name].broken for name in (*PLUGIN_CALLBACKS, "magnitude"))
    assert type(lp.create_callback("zz_good")).__name__ == "Good"
    with pytest.raises(ImportError, match="deliberately broken plugin"):
        lp.get_callback("zz_bad")
    monkeypatch.undo()  # "uninstall": the directory leaves sys.path
    sys.modules.pop("broken_prune_plugin.good", None)
    sys.modules.pop("broken_prune_plugin", None)
    _registry._reset_cache()
    assert not {"zz_bad", "zz_good"} & set(lp.list_callbacks())


def test_lightning_prune_list_command_in_a_fresh_process(tmp_path):
    site = _broken_distribution(tmp_path)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(site), str(REPO), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
    }
    script = Path(sys.executable).with_name("lightning-prune")
    command = (
        [str(script), "list"] if script.exists() else [sys.executable, "-m", "lightning_prune.cli", "list"]
    )
    # `list` reads the sources, nothing imported: both rows are there; `list --check` imports, sees the error
    static = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert static.returncode == 0, static.stderr
    assert _row(static.stdout, "zz_good").split()[2:5] == ["broken-prune-plugin", "0.3", "ok"]
    assert _row(static.stdout, "zz_good").endswith("A working callback shipped beside the broken one.")
    assert _row(static.stdout, "zz_bad").split()[2:4] == ["broken-prune-plugin", "0.3"]
    result = subprocess.run([*command, "--check"], env=env, capture_output=True, text=True, timeout=300,
                            check=False)
    assert result.returncode == 0, result.stderr
    assert _row(result.stdout, "first_k").split()[2:5] == [PLUGIN, version(PLUGIN), "ok"]
    assert _row(result.stdout, "zz_good").split()[2:5] == ["broken-prune-plugin", "0.3", "ok"]
    bad = _row(result.stdout, "zz_bad")
    assert (
        bad.split()[2:5] == ["broken-prune-plugin", "0.3", "BROKEN"] and "deliberately broken plugin" in bad
    )


def test_plugin_callbacks_attach_through_the_environment(monkeypatch):
    monkeypatch.setenv(
        "LIGHTNING_PRUNE",
        "first_k:target_sparsity=0.3,prune_step=4;"
        "random_channels:seed=3,sparsity_end_step=0.5,every_n_steps=20",
    )
    first_k, random_channels = callbacks_from_env()
    assert (type(first_k).__name__, first_k.target_sparsity, first_k.prune_step) == ("FirstKChannels", 0.3, 4)
    assert (type(random_channels).__name__, random_channels.seed) == ("RandomChannels", 3)
    assert (random_channels.sparsity_end_step, random_channels.every_n_steps) == (0.5, 20)


def test_the_contract_s_minimal_example_keeps_the_contract(tmp_path, monkeypatch):
    readme = (REPO / "plugins" / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    source = next(b for b in blocks if "class OneShotMagnitude" in b)
    module = types.ModuleType("plugin_readme_example")
    monkeypatch.setitem(
        sys.modules, module.__name__, module
    )  # pickling (ddp_spawn) needs an importable class
    exec(compile(source, "plugins/README.md", "exec"), module.__dict__)
    state = check_callback_conformance(
        lambda: module.OneShotMagnitude(target_sparsity=0.6, prune_epoch=1, verbose=False),
        tmp_path,
        max_epochs=2,
        limit_train_batches=2,
    )
    assert state["pruned_at_step"] == 2
    pruned = sum(int((~m).sum()) for m in state["masks"].values())
    assert pruned / sum(m.numel() for m in state["masks"].values()) == pytest.approx(0.6, abs=0.01)


def _documented_plugin_api() -> dict[str, set[str]]:
    """The table "What a plugin may import" of plugins/README.md: module -> names."""
    readme = (REPO / "plugins" / "README.md").read_text()
    section = readme.split("### What a plugin may import", 1)[1].split("\n## ", 1)[0]
    api: dict[str, set[str]] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 2 and cells[0].startswith("`lightning_prune"):
            module = cells[0].split("`")[1]
            api[module] = set(re.findall(r"`(\w+)`", cells[1]))
    return api


def test_the_documented_plugin_api_exists():
    import importlib

    api = _documented_plugin_api()
    assert {"lightning_prune", "lightning_prune.callbacks.base", "lightning_prune.validation"} <= set(api)
    for module_name, names in api.items():
        module = importlib.import_module(module_name)
        public = set(getattr(module, "__all__", ()))
        for name in names:
            assert hasattr(module, name), (
                f"plugins/README.md names {module_name}.{name}, which does not exist")
            assert name in public, f"{module_name}.{name} is documented for plugins but not in its __all__"


def test_the_baselines_plugin_imports_only_the_documented_api():
    import ast

    api = _documented_plugin_api()
    sources = sorted((REPO / "plugins" / "lightning-prune-baselines" / "src").rglob("*.py"))
    assert len(sources) >= 5
    used = []
    for path in sources:
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.ImportFrom) and node.module
                    and node.module.split(".")[0] == "lightning_prune"):
                used.extend((path.name, node.module, alias.name) for alias in node.names)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    assert alias.name.split(".")[0] != "lightning_prune" or alias.name == "lightning_prune", (
                        f"{path.name} imports the module {alias.name}: import names from the documented"
                        " modules")
    assert used, "the plugin imports nothing from lightning_prune?"
    for filename, module, name in used:
        assert module in api, f"{filename} imports from {module}, which plugins/README.md does not list"
        assert name in api[module], (
            f"{filename} imports {module}.{name}, which plugins/README.md does not list")
