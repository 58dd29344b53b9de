from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import prefixcap
from prefixcap.errors import PluginError, UnknownComponentError
from prefixcap.registry import KINDS, get_component, list_components, registry, reload_registry

from conftest import PLUGIN_DIST

BUILTINS = {
    ("encoder", "siglip"), ("encoder", "clip"), ("encoder", "vit"), ("connector", "linear"), ("connector", "mlp"),
    ("decoder", "causal-lm"), ("decoder", "smollm"), ("decoder", "qwen2"), ("decoder", "phi"),
    ("loss", "caption-ce"), ("system", "prefix"),
}  # fmt: skip


def test_builtins_register_through_entry_points_as_prefixcap():
    rows = list_components()
    assert BUILTINS <= {(r.kind, r.name) for r in rows}
    for r in rows:
        assert r.provider.dist == "prefixcap"
        assert r.provider.version == prefixcap.__version__
        assert r.provider.plugin in {"encoders", "connectors", "decoders", "losses", "systems", "datasets"}
        assert r.description and "\n" not in r.description
    assert registry().broken == []


def test_listing_filters_by_kind_and_pattern():
    assert {r.name for r in list_components("decoder")} == {"causal-lm", "phi", "qwen2", "smollm"}
    assert [r.name for r in list_components("connector", pattern="^ml")] == ["mlp"]
    with pytest.raises(PluginError, match="unknown component kind 'decoders'"):
        list_components("decoders")


def test_listing_and_loading_recipes_do_not_import_torch():
    code = (
        "import sys, prefixcap; prefixcap.list_components(); prefixcap.load_recipe('quickstart'); "
        "print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_unknown_name_suggests_the_closest():
    with pytest.raises(UnknownComponentError) as e:
        get_component("encoder", "siglp")
    assert e.value.suggestions == ["siglip"]
    assert "did you mean 'siglip'?" in str(e.value)
    with pytest.raises(UnknownComponentError, match="registered decoders: causal-lm, phi, qwen2, smollm"):
        get_component("decoder", "zzz")


def test_only_components_that_load_weights_take_a_checkpoint():
    takes = {(r.kind, r.name) for r in list_components() if "checkpoint" in r.options.model_fields}
    assert takes == {("encoder", "siglip"), ("encoder", "clip"), ("encoder", "vit"), ("decoder", "causal-lm"),
                     ("decoder", "smollm"), ("decoder", "qwen2"), ("decoder", "phi"),
                     ("loss", "clip-align")}  # fmt: skip
    assert all(issubclass(get_component(kind, name).options, prefixcap.CheckpointOptions) for kind, name in takes)
    with pytest.raises(PluginError, match="checkpoint"):
        prefixcap.create("connector", "mlp", {"checkpoint": "tiny"}, in_dim=4, out_dim=6, in_tokens=9)


def test_create_validates_options_with_the_components_model():
    connector = prefixcap.create("connector", "mlp", {"hidden": 8}, in_dim=4, out_dim=6, in_tokens=9)
    assert connector(torch.zeros(2, 9, 4)).shape == (2, 9, 6)
    with pytest.raises(PluginError, match="hidden"):
        prefixcap.create("connector", "mlp", {"hidden": "wide"}, in_dim=4, out_dim=6, in_tokens=9)


def test_third_party_plugin_is_listed_with_its_distribution_and_builds(with_plugin):
    reg = get_component("connector", "scaled-linear")
    assert (reg.provider.dist, reg.provider.version, reg.provider.plugin) == (PLUGIN_DIST, "0.3.1", "good")
    assert reg.description == "Linear projection times a constant"
    torch.manual_seed(0)
    scaled = prefixcap.create("connector", "scaled-linear", {"scale": 3.0}, in_dim=4, out_dim=5, in_tokens=4)
    x = torch.randn(1, 4, 4)
    assert torch.allclose(scaled(x), 3.0 * scaled.proj(x))


def test_broken_plugins_are_reported_and_do_not_stop_the_others(with_plugin):
    errors = {b.provider.plugin: b.error for b in with_plugin.broken}
    assert "this plugin needs libfoo" in errors["broken_import"]
    assert "register_losses failed: RuntimeError: hook exploded" in errors["raising_hook"]
    assert "invalid decoder name 'Not A Name'" in errors["bad_registration"]
    assert all(b.provider.dist == PLUGIN_DIST for b in with_plugin.broken)
    # everything else still works: the good plugin's component and the builtins
    assert get_component("connector", "scaled-linear")
    assert get_component("loss", "caption-ce").provider.dist == "prefixcap"


def test_load_plugins_env_var_selects_distributions(plugin_site, monkeypatch):
    monkeypatch.syspath_prepend(str(plugin_site))
    monkeypatch.delenv("PREFIXCAP_LOAD_PLUGINS")  # unset: every installed plugin loads
    assert ("connector", "scaled-linear") in {(r.kind, r.name) for r in reload_registry().list()}
    monkeypatch.setenv("PREFIXCAP_LOAD_PLUGINS", "")  # empty: builtins only
    reg = reload_registry()
    assert ("connector", "scaled-linear") not in {(r.kind, r.name) for r in reg.list()}
    assert reg.broken == [] and BUILTINS <= {(r.kind, r.name) for r in reg.list()}
    monkeypatch.setenv("PREFIXCAP_LOAD_PLUGINS", "Prefixcap_TestPlugin")  # names are normalised like pip's
    assert reload_registry().get("connector", "scaled-linear")


def test_uninstalled_plugin_disappears(plugin_site, monkeypatch):
    monkeypatch.setenv("PREFIXCAP_LOAD_PLUGINS", PLUGIN_DIST)
    monkeypatch.syspath_prepend(str(plugin_site))
    assert reload_registry().get("connector", "scaled-linear")
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(plugin_site)])
    with pytest.raises(UnknownComponentError):
        reload_registry().get("connector", "scaled-linear")


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_has_a_hook(kind):
    from prefixcap import hookspecs
    from prefixcap.registry import HOOKS

    assert callable(getattr(hookspecs, HOOKS[kind]))
