"""Test set-up: builtins only by default, so a plugin installed on the developer's machine never changes results."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from prefixcap.registry import reload_registry

REPO = Path(__file__).resolve().parent.parent
os.environ["PREFIXCAP_LOAD_PLUGINS"] = ""  # inherited by CLI subprocesses too
os.environ["HF_HUB_OFFLINE"] = "1"  # nothing in the suite may reach for the hub


@pytest.fixture(autouse=True)
def builtins_only(monkeypatch):
    monkeypatch.setenv("PREFIXCAP_LOAD_PLUGINS", "")
    reload_registry()
    yield
    reload_registry()


def plugin_pyproject(name: str, version: str, package: str, entry_points: dict[str, str],
                     dependencies: tuple[str, ...] = ()) -> str:
    """The pyproject.toml of a throwaway plugin distribution: one package, entry points in the prefixcap group."""
    points = "\n".join(f'{key} = "{value}"' for key, value in entry_points.items())
    quoted = ", ".join(f'"{d}"' for d in dependencies)
    deps = f"dependencies = [{quoted}]\n" if dependencies else ""
    return (f'[build-system]\nrequires = ["setuptools>=68"]\nbuild-backend = "setuptools.build_meta"\n'
            f'[project]\nname = "{name}"\nversion = "{version}"\n{deps}[project.entry-points.prefixcap]\n{points}\n'
            f'[tool.setuptools]\npackages = ["{package}"]\n')


# A throwaway third-party distribution, installed for real by pip (with --target, so the test environment itself
# is never modified). Each entry point exercises one way a plugin can behave.
PLUGIN_DIST = "prefixcap-testplugin"
PLUGIN_FILES = {
    "pyproject.toml": plugin_pyproject(PLUGIN_DIST, "0.3.1", "pcap_testplugin", {
        name: f"pcap_testplugin.{name}" for name in ("good", "broken_import", "raising_hook", "clash",
                                                      "bad_registration")}),  # fmt: skip
    "pcap_testplugin/__init__.py": "",
    "pcap_testplugin/good.py": """
        from prefixcap import ComponentOptions, hookimpl

        class ScaleOptions(ComponentOptions):
            scale: float = 2.0

        @hookimpl
        def register_connectors(register):
            register("scaled-linear", factory="pcap_testplugin.scaled:ScaledLinear", options=ScaleOptions,
                     description="Linear projection times a constant\\nsecond line is not shown")
    """,
    "pcap_testplugin/scaled.py": """
        from prefixcap.connectors.linear import LinearConnector
        from prefixcap.connectors import LinearOptions

        class ScaledLinear(LinearConnector):
            def __init__(self, options, *, in_dim, out_dim, in_tokens):
                super().__init__(LinearOptions(), in_dim=in_dim, out_dim=out_dim, in_tokens=in_tokens)
                self.scale = options.scale

            def forward(self, tokens):
                return super().forward(tokens) * self.scale
    """,
    "pcap_testplugin/broken_import.py": """
        raise ImportError("this plugin needs libfoo, which is not installed")
    """,
    "pcap_testplugin/raising_hook.py": """
        from prefixcap import hookimpl

        @hookimpl
        def register_losses(register):
            raise RuntimeError("hook exploded")
    """,
    "pcap_testplugin/clash.py": """
        from prefixcap import hookimpl

        @hookimpl
        def register_encoders(register):
            register("siglip", factory="pcap_testplugin.nowhere:Encoder", description="an impostor")
    """,
    "pcap_testplugin/bad_registration.py": """
        from prefixcap import hookimpl

        @hookimpl
        def register_decoders(register):
            register("Not A Name", factory="x:y")
    """,
}


def install_distribution(files: dict[str, str], src: Path, site: Path) -> Path:
    """Write a distribution's ``files`` (dedented) under ``src`` and pip-install it into ``site``; returns ``site``."""
    for rel, text in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text(textwrap.dedent(text).lstrip())
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
         "--target", str(site), str(src)],
        check=True,
    )  # fmt: skip
    return site


@pytest.fixture(scope="session")
def plugin_site(tmp_path_factory) -> Path:
    """Directory that pip installed the test plugin distribution into (put it on sys.path to 'install' it)."""
    return install_distribution(PLUGIN_FILES, tmp_path_factory.mktemp("plugin-src"),
                                tmp_path_factory.mktemp("plugin-site"))  # fmt: skip


@pytest.fixture
def with_plugin(plugin_site, monkeypatch):
    """The test plugin installed and allowed to load."""
    monkeypatch.syspath_prepend(str(plugin_site))
    monkeypatch.setenv("PREFIXCAP_LOAD_PLUGINS", PLUGIN_DIST)
    return reload_registry()


def fit_batch(system, images, captions, steps: int, lr: float = 1e-2) -> None:
    """Train ``system`` for ``steps`` AdamW steps on one batch (all its param groups at one LR), then eval mode."""
    import torch

    system.train()
    optimizer = torch.optim.AdamW([p for g in system.param_groups() for p in g.params], lr=lr)
    batch = system.make_batch(images, captions)
    for _ in range(steps):
        loss, _ = system.loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    system.eval()


def run_cli(*args: str, env: dict[str, str] | None = None, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """Run the installed `prefixcap` console script as a user would."""
    exe = Path(sys.executable).with_name("prefixcap")
    full_env = {**os.environ, "COLUMNS": "200", **(env or {})}
    return subprocess.run([str(exe), *args], capture_output=True, text=True, env=full_env, cwd=cwd, timeout=300)


# The quickstart recipe trained briefly: long enough to state most held-out scenes exactly (tests/test_learning.py
# holds it to that), short enough for the suite. Shared by the learning tests and the browser test, which exports it.
QUICKSTART_SHORT = ["train.steps=300", "data.train_size=2000", "data.val_size=50", "data.test_size=200",
                    "eval.every_steps=300", "output.save_every_steps=300", "eval.clip_model=null",
                    "output.tensorboard=false"]  # fmt: skip


def train_quietly(recipe, overrides: list[str], run_dir: Path, cache: Path):
    """prefixcap.train.run on one thread with its own feature cache (never the user's): the RunResult."""
    import torch

    from prefixcap.train import run

    threads, previous = torch.get_num_threads(), os.environ.get("PREFIXCAP_CACHE")
    torch.set_num_threads(1)  # these small models train fastest on one thread, the more so on a shared machine
    os.environ["PREFIXCAP_CACHE"] = str(cache)
    try:
        return run(recipe, overrides, run_dir=run_dir, report=lambda row: None)
    finally:
        torch.set_num_threads(threads)
        if previous is None:
            os.environ.pop("PREFIXCAP_CACHE")
        else:
            os.environ["PREFIXCAP_CACHE"] = previous


@pytest.fixture(scope="session")
def quickstart_short(tmp_path_factory):
    """The RunResult of `prefixcap run quickstart` with QUICKSTART_SHORT (its run directory is result.run_dir)."""
    root = tmp_path_factory.mktemp("quickstart-short")
    return train_quietly("quickstart", QUICKSTART_SHORT, root / "run", root / "cache")
