"""Broken plugins, end to end: the real entry-point machinery (pip-installed throwaway distributions, loaded by the
`prefixcap` console script in a subprocess), so what a user sees is what is tested.

A plugin whose import raises (or calls sys.exit), whose hook raises, that registers an invalid or duplicate name, or
that implements a hook prefixcap does not have is listed by `prefixcap plugins` as broken, with its error, and stops
nothing else: the builtins and the good plugin's components are listed and work. PREFIXCAP_LOAD_PLUGINS chooses the
third-party distributions to load, and says so when it names one that is not installed.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import yaml
from click.testing import CliRunner

import prefixcap
from prefixcap.cli import cli
from prefixcap.registry import get_component, reload_registry

from conftest import PLUGIN_DIST, install_distribution, plugin_pyproject, run_cli

# A second throwaway distribution: one more way to break per entry point, and a rival of the first one.
RIVAL_DIST = "prefixcap-rivalplugin"
RIVAL_FILES = {
    "pyproject.toml": plugin_pyproject(RIVAL_DIST, "1.0.0", "pcap_rival", {
        name: f"pcap_rival.{name}" for name in ("rival", "exits", "markup", "typo", "lazy")}),
    "pcap_rival/__init__.py": "",
    "pcap_rival/rival.py": """
        from prefixcap import hookimpl

        @hookimpl
        def register_connectors(register):
            # the same name as prefixcap-testplugin's connector: neither wins
            register("scaled-linear", factory="pcap_rival.nowhere:Other", description="a rival")
            register("rival-linear", factory="prefixcap.connectors.linear:LinearConnector",
                     options=__import__("prefixcap.connectors", fromlist=["LinearOptions"]).LinearOptions,
                     description="The builtin linear connector under another name")
    """,
    "pcap_rival/exits.py": """
        import sys
        sys.exit("this plugin refuses to run here")
    """,
    "pcap_rival/markup.py": """
        from prefixcap import hookimpl

        @hookimpl
        def register_losses(register):
            raise ValueError("[/red] closing tag, [bold]markup[/bold] and\\na second line " + "x" * 5000)
    """,
    "pcap_rival/typo.py": """
        from prefixcap import hookimpl

        @hookimpl
        def register_connector(register):  # the hook is register_connectors
            register("never-registered", factory="x:y")
    """,
    "pcap_rival/lazy.py": """
        from prefixcap import hookimpl
        from prefixcap.connectors import LinearOptions

        @hookimpl
        def register_connectors(register):
            register("lazy-broken", factory="pcap_rival.heavy:Connector", options=LinearOptions,
                     description="its module only fails when the connector is built")
    """,
    "pcap_rival/heavy.py": """
        import libthatdoesnotexist  # noqa: F401
    """,
}

TINY_RECIPE = {
    "encoder": {"name": "vit", "checkpoint": "tiny"},
    "connector": {"name": "scaled-linear", "scale": 3.0},
    "decoder": {"name": "smollm", "checkpoint": "tiny", "finetune": "full"},
}


@pytest.fixture(scope="module")
def rival_site(tmp_path_factory):
    src, site = tmp_path_factory.mktemp("rival-src"), tmp_path_factory.mktemp("rival-site")
    return install_distribution(RIVAL_FILES, src, site)


def env_for(*sites, load: str | None) -> dict[str, str]:
    env = {"PYTHONPATH": os.pathsep.join(map(str, sites))}
    if load is not None:
        env["PREFIXCAP_LOAD_PLUGINS"] = load
    return env


def listing(env: dict[str, str]) -> dict:
    done = run_cli("plugins", "--json", env=env)
    assert "Traceback" not in done.stderr, done.stderr
    data = json.loads(done.stdout)
    assert done.returncode == (1 if data["broken"] else 0), done.stderr  # valid JSON either way
    return data


def rows(data: dict) -> dict[tuple[str, str], dict]:
    return {(c["kind"], c["name"]): c for c in data["components"]}


def broken(data: dict) -> dict[str, str]:
    return {b["plugin"]: b["error"] for b in data["broken"]}


@pytest.fixture(scope="module")
def builtins_listing():
    """What `prefixcap plugins --json` lists with no third-party plugin: the builtins, every one from prefixcap."""
    data = listing({"PREFIXCAP_LOAD_PLUGINS": ""})
    assert data["broken"] == []
    assert {c["distribution"] for c in data["components"]} == {"prefixcap"}
    return rows(data)


def write_recipe(tmp_path, data: dict, name: str = "r.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


# --- one plugin distribution with a good plugin and four broken ones ----------------------------------------------


def test_plugins_command_lists_each_broken_plugin_with_its_error_and_all_the_rest(plugin_site, builtins_listing):
    env = env_for(plugin_site, load=PLUGIN_DIST)
    data = listing(env)
    errors = broken(data)
    assert set(errors) == {"broken_import", "raising_hook", "clash", "bad_registration"}
    assert errors["broken_import"].startswith("cannot load pcap_testplugin.broken_import: ImportError: this plugin "
                                              "needs libfoo, which is not installed (broken_import.py:1)")  # fmt: skip
    assert errors["raising_hook"] == "register_losses failed: RuntimeError: hook exploded (raising_hook.py:5)"
    assert errors["clash"] == (f"encoder 'siglip' clashes with the builtin one (prefixcap {prefixcap.__version__}), "
                               "which stays; rename it")  # fmt: skip
    assert errors["bad_registration"].startswith("register_decoders failed: PluginError: invalid decoder name "
                                                 "'Not A Name'")  # fmt: skip
    assert all(b["distribution"] == PLUGIN_DIST and b["version"] == "0.3.1" for b in data["broken"])
    listed = rows(data)
    good = listed[("connector", "scaled-linear")]
    assert (good["distribution"], good["version"], good["plugin"]) == (PLUGIN_DIST, "0.3.1", "good")
    assert good["description"] == "Linear projection times a constant"
    # every builtin is still there, from prefixcap, the clashed siglip included
    assert {k: v for k, v in listed.items() if v["distribution"] == "prefixcap"} == builtins_listing

    table = run_cli("plugins", env=env)
    assert table.returncode == 1 and "Traceback" not in table.stderr, table.stderr
    lines = table.stdout.splitlines()
    broken_rows = [line for line in lines if line.startswith("│ broken")]
    assert len(broken_rows) == 4
    for plugin, text in [("broken_import", "this plugin needs libfoo"), ("raising_hook", "hook exploded"),
                         ("clash", "clashes with the builtin one"), ("bad_registration", "invalid decoder name")]:
        assert any(plugin in line and text in line for line in broken_rows), (plugin, broken_rows)
    assert any("scaled-linear" in line and PLUGIN_DIST in line for line in lines)
    assert any(line.startswith("│ encoder   │ siglip") and "prefixcap" in line for line in lines)


def test_the_good_plugin_validates_through_the_cli_beside_the_broken_ones(plugin_site, tmp_path):
    env = env_for(plugin_site, load=PLUGIN_DIST)
    done = run_cli("validate", str(write_recipe(tmp_path, {**TINY_RECIPE, "encoder": {"name": "siglip",
                                                                                      "checkpoint": "tiny"}})),
                   "--json", env=env)  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    parts = {c["slot"]: c for c in report["components"]}
    assert parts["connector"]["name"] == "scaled-linear" and parts["encoder"]["name"] == "siglip"
    assert parts["connector"]["total"] == 64 * 64 + 64  # tiny siglip width 64 -> tiny smollm width 64, with bias
    assert "Traceback" not in done.stderr


def test_the_good_plugin_composes_and_runs_in_process(with_plugin):
    assert {b.provider.plugin for b in with_plugin.broken} == {"broken_import", "raising_hook", "clash",
                                                               "bad_registration"}  # fmt: skip
    torch.manual_seed(0)
    system = prefixcap.compose(TINY_RECIPE)
    connector = system.connector
    assert type(connector).__module__ == "pcap_testplugin.scaled" and connector.scale == 3.0
    tokens = torch.randn(2, system.encoder.num_tokens, system.encoder.dim)
    assert torch.allclose(connector(tokens), 3.0 * connector.proj(tokens))
    images = [torch.rand(3, 32, 32) for _ in range(2)]
    loss, _ = system.loss(system.make_batch(images, ["a red circle", "a blue square"]))
    assert torch.isfinite(loss)


def test_a_plugin_cannot_take_a_builtins_name(with_plugin):
    """Moved here from test_registry.py and changed: the clash used to make the builtin siglip ambiguous, unusable
    while the plugin was installed; now the newcomer is the broken one and the builtin keeps working."""
    clash = [b.error for b in with_plugin.broken if b.provider.plugin == "clash"]
    assert clash == [f"encoder 'siglip' clashes with the builtin one (prefixcap {prefixcap.__version__}), which stays; "
                     "rename it"]  # fmt: skip
    assert get_component("encoder", "siglip").provider.dist == "prefixcap"
    recipe = prefixcap.load_recipe({"encoder": {"name": "siglip", "checkpoint": "tiny"}})
    assert recipe.encoder.options.checkpoint == "tiny"


# --- two plugin distributions: more ways to break, and a clash between two third parties ----------------------------


def test_more_broken_plugins_and_a_clash_between_two_third_parties(plugin_site, rival_site, builtins_listing):
    env = env_for(plugin_site, rival_site, load=f"{PLUGIN_DIST},{RIVAL_DIST}")
    data = listing(env)
    errors = {(b["distribution"], b["plugin"]): b["error"] for b in data["broken"]}
    assert errors[(RIVAL_DIST, "exits")] == ("cannot load pcap_rival.exits: SystemExit: this plugin refuses to run "
                                             "here (exits.py:2)")  # fmt: skip
    markup = errors[(RIVAL_DIST, "markup")]
    assert markup.startswith("register_losses failed: ValueError: [/red] closing tag, [bold]markup[/bold] and a "
                             "second line xxx") and len(markup) < 400 and "\n" not in markup  # fmt: skip
    assert errors[(RIVAL_DIST, "typo")] == (
        "pcap_rival.typo implements register_connector, which prefixcap does not call (its hooks: register_encoders, "
        "register_connectors, register_decoders, register_losses, register_systems, register_datasets)")
    # distributions load in name order: the rival's connector came first, the test plugin's is the newcomer
    clash = f"connector 'scaled-linear' clashes with the one registered by {RIVAL_DIST} 1.0.0"
    assert errors[(PLUGIN_DIST, "good")] == clash
    listed = rows(data)
    assert ("connector", "scaled-linear") not in listed  # ambiguous now: neither is listed as the one
    assert listed[("connector", "rival-linear")]["distribution"] == RIVAL_DIST
    assert listed[("connector", "lazy-broken")]["distribution"] == RIVAL_DIST
    assert {k: v for k, v in listed.items() if v["distribution"] == "prefixcap"} == builtins_listing

    table = run_cli("plugins", env=env)  # error texts hold rich markup: printed as text, never interpreted
    assert table.returncode == 1 and "Traceback" not in table.stderr, table.stderr
    assert "[/red] closing tag, [bold]markup[/bold]" in table.stdout
    assert len([line for line in table.stdout.splitlines() if line.startswith("│ broken")]) == 8



def test_using_a_clashed_or_unimportable_component_is_a_clear_error(plugin_site, rival_site, monkeypatch, tmp_path):
    """`prefixcap validate` in-process (click's CliRunner; torch is already imported here), same entry points."""
    monkeypatch.syspath_prepend(str(plugin_site))
    monkeypatch.syspath_prepend(str(rival_site))
    monkeypatch.setenv("PREFIXCAP_LOAD_PLUGINS", f"{PLUGIN_DIST},{RIVAL_DIST}")
    reload_registry()
    runner = CliRunner(env={"PREFIXCAP_DEBUG": None})
    base = {**TINY_RECIPE, "encoder": {"name": "siglip", "checkpoint": "tiny"}}

    def validate(data: dict, name: str):
        result = runner.invoke(cli, ["validate", str(write_recipe(tmp_path, data, name))])
        assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
        assert "Traceback" not in result.output
        return result

    clashed = validate(base, "clash.yaml")
    assert clashed.exit_code == 2
    assert (f"connector.name: connector 'scaled-linear' is registered by both {RIVAL_DIST} 1.0.0 and {PLUGIN_DIST} "
            "0.3.1; uninstall one, or choose the plugins to load with PREFIXCAP_LOAD_PLUGINS") in clashed.stderr
    lazy = validate({**base, "connector": "lazy-broken"}, "lazy.yaml")
    assert lazy.exit_code == 2
    assert lazy.stderr.startswith(f"error: connector 'lazy-broken' from {RIVAL_DIST} 1.0.0: cannot import "
                                  "pcap_rival.heavy:Connector: ModuleNotFoundError: No module named "
                                  "'libthatdoesnotexist'")  # fmt: skip
    ok = validate({**base, "connector": "rival-linear"}, "ok.yaml")
    assert ok.exit_code == 0, ok.output
    assert "rival-linear" in ok.stdout


# --- choosing what loads -------------------------------------------------------------------------------------------


def test_load_plugins_env_var_through_the_cli(plugin_site, rival_site, builtins_listing, monkeypatch):
    sites = (plugin_site, rival_site)
    nothing = listing(env_for(*sites, load=""))
    assert rows(nothing) == builtins_listing and nothing["broken"] == []
    one = listing(env_for(*sites, load=PLUGIN_DIST))
    assert ("connector", "scaled-linear") in rows(one) and ("connector", "rival-linear") not in rows(one)
    assert {b["distribution"] for b in one["broken"]} == {PLUGIN_DIST}
    spelled = listing(env_for(*sites, load=" Prefixcap_TestPlugin , "))  # normalised as pip does; blanks ignored
    assert rows(spelled) == rows(one)
    monkeypatch.delenv("PREFIXCAP_LOAD_PLUGINS")
    everything = listing(env_for(*sites, load=None))  # unset: every installed plugin
    assert {("connector", "rival-linear"), ("connector", "lazy-broken")} <= set(rows(everything))
    assert {PLUGIN_DIST, RIVAL_DIST} <= {b["distribution"] for b in everything["broken"]}


def test_load_plugins_naming_a_distribution_that_is_not_a_plugin_is_reported(plugin_site):
    typo = listing(env_for(plugin_site, load="prefixcap-testplugni"))
    assert {c["distribution"] for c in typo["components"]} == {"prefixcap"}  # nothing else loads
    (row,) = typo["broken"]
    assert row["distribution"] == "prefixcap-testplugni"
    assert row["error"].startswith("PREFIXCAP_LOAD_PLUGINS names 'prefixcap-testplugni', which is not installed; did "
                                   f"you mean {PLUGIN_DIST}? (installed plugin distributions: ")  # fmt: skip
    not_a_plugin = listing(env_for(plugin_site, load=f"pyyaml,{PLUGIN_DIST}"))
    assert broken(not_a_plugin)[""].startswith("PREFIXCAP_LOAD_PLUGINS names 'pyyaml', which is installed but has no "
                                                "prefixcap plugins")  # fmt: skip
    assert ("connector", "scaled-linear") in rows(not_a_plugin)  # the other name still loads


def test_in_process_registry_reports_an_unknown_distribution(plugin_site, monkeypatch):
    monkeypatch.syspath_prepend(str(plugin_site))
    monkeypatch.setenv("PREFIXCAP_LOAD_PLUGINS", "no-such-plugin-dist")
    reg = reload_registry()
    (row,) = reg.broken
    assert row.error.startswith("PREFIXCAP_LOAD_PLUGINS names 'no-such-plugin-dist', which is not installed")
    assert get_component("encoder", "siglip").provider.dist == "prefixcap"
