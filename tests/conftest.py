"""Test set-up: builtins only by default, so a plugin installed on the developer's machine never changes results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from PIL import Image

from prefixcap.registry import reload_registry

REPO = Path(__file__).resolve().parent.parent
os.environ["PREFIXCAP_LOAD_PLUGINS"] = ""  # inherited by CLI subprocesses too
os.environ["HF_HUB_OFFLINE"] = "1"  # nothing in the suite may reach for the hub
if os.environ.get("PYTEST_XDIST_WORKER"):
    # One core per worker: torch's default of a thread per core would make the workers' threads spin-wait for each
    # other (a small model's step then takes many times longer). Inherited by the runs the tests start, too.
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)


SUMMARY = pytest.StashKey[list]()


def report_in_summary(config: pytest.Config, line: str) -> None:
    """Print ``line`` in pytest's closing summary, from pytest's own process or a pytest-xdist worker alike (a
    worker has no terminal: its lines travel back to the controller with the worker's output)."""
    if hasattr(config, "workeroutput"):
        config.workeroutput.setdefault("prefixcap_summary", []).append(line)
    else:
        config.stash.setdefault(SUMMARY, []).append(line)


def pytest_testnodedown(node, error):
    node.config.stash.setdefault(SUMMARY, []).extend(getattr(node, "workeroutput", {}).get("prefixcap_summary", []))


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    for line in config.stash.get(SUMMARY, []):
        terminalreporter.write_line(line)


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


# A tiny LoRA prefix system and a batch of three plain colours it learns to tell apart (tests of saving and loading).
TINY = {
    "encoder": {"name": "siglip", "checkpoint": "tiny"},
    "connector": {"name": "mlp", "hidden": 32, "dropout": 0.0},
    # grouped-query attention, as the real SmolLM has (a tiny decoder has one key/value head per head unless asked)
    "decoder": {"name": "smollm", "checkpoint": "tiny", "tiny": {"num_key_value_heads": 2},
                "lora": {"r": 4, "dropout": 0.0}},
}
IMAGES = [Image.new("RGB", (40, 40), c) for c in ("red", "navy", "white")]
CAPTIONS = ["a red square", "a dark blue square", "a white square"]


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


def tiny_checkpoint_options(reg, directory: Path, options: dict | None = None) -> dict:
    """Recipe options that build ``reg`` from a tiny checkpoint the component writes into ``directory`` in its
    library's own format (its write_tiny_checkpoint, given ``options`` or its defaults); {} if it loads none."""
    from pydantic import ValidationError

    writer = getattr(reg.load_factory(), "write_tiny_checkpoint", None)
    if writer is None:
        return {}
    try:
        parsed = reg.parse_options(options or {})
    except ValidationError:  # e.g. causal-lm, whose checkpoint is required
        if "checkpoint" not in reg.options.model_fields:  # only components that load weights have one
            raise
        parsed = reg.parse_options({**(options or {}), "checkpoint": "tiny"})
    directory.mkdir(parents=True, exist_ok=True)
    return writer(directory, parsed)


def run_cli(*args: str, env: dict[str, str] | None = None, cwd: Path = REPO,
            input: str | None = None) -> subprocess.CompletedProcess:  # fmt: skip
    """Run the installed `prefixcap` console script as a user would (``input``: its stdin)."""
    exe = Path(sys.executable).with_name("prefixcap")
    full_env = {**os.environ, "COLUMNS": "200", **(env or {})}
    return subprocess.run([str(exe), *args], capture_output=True, text=True, env=full_env, cwd=cwd, timeout=300,
                          input=input)  # fmt: skip


# The quickstart recipe trained briefly: long enough to state most held-out scenes exactly (tests/test_learning.py
# holds it to that), short enough for the suite. Shared by the learning tests and the browser test, which exports it.
QUICKSTART_SHORT = ["train.steps=300", "data.train_size=2000", "data.val_size=50", "data.test_size=200",
                    "eval.every_steps=300", "output.save_every_steps=300", "eval.clip_model=null",
                    "output.tensorboard=false"]  # fmt: skip


def train_quietly(recipe, overrides: list[str], run_dir: Path, cache: Path, stop_after: int | None = None,
                  report=lambda event: None):
    """prefixcap.training.run on one thread with the given feature cache (never the user's), saying nothing unless
    given ``report``: the RunResult."""
    import torch

    from prefixcap.training import run

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # these small models train fastest on one thread, the more so on a shared machine
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("PREFIXCAP_CACHE", str(cache))
            return run(recipe, overrides, run_dir=run_dir, stop_after=stop_after, report=report)
    finally:
        torch.set_num_threads(threads)


def session_directory(tmp_path_factory) -> Path:
    """pytest's temporary directory for this session, the same for every pytest-xdist worker."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def learning_cache(tmp_path_factory) -> Path:
    """The feature cache of the learning runs: they train on the same 2,000 images, encoded once. Concurrent writers
    are safe (each renames a complete file into place), so workers share it."""
    return session_directory(tmp_path_factory) / "learning-feature-cache"


@pytest.fixture(scope="session")
def quickstart_short(tmp_path_factory):
    """The RunResult of `prefixcap run quickstart` with QUICKSTART_SHORT (its run directory is result.run_dir).

    Trained once per pytest session, not once per pytest-xdist worker: the first worker to ask trains it in the
    session's shared temporary directory while holding a lock, the others wait for it and read the run back."""
    import fcntl

    from prefixcap.training import RunResult

    root = session_directory(tmp_path_factory) / "quickstart-short"
    root.mkdir(exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / "done").exists():
            train_quietly("quickstart", QUICKSTART_SHORT, root / "run", learning_cache(tmp_path_factory))
            (root / "done").touch()
    run_dir = root / "run"
    history = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return RunResult(run_dir, metrics, history[-1]["step"], history)


@pytest.fixture(scope="session")
def shapes_files(tmp_path_factory) -> Path:
    """The quickstart's shapes data as PNG files and JSONL indexes, a shuffled train index too (learning.py)."""
    from learning import write_shapes_files

    return write_shapes_files(tmp_path_factory.mktemp("shapes-files"))


def update_json(path: Path, key: str, value) -> None:
    """Set ``key`` in the JSON object in ``path`` (a report several tests, maybe in several workers, write into)."""
    import fcntl

    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        text = f.read()
        data = json.loads(text) if text.strip() else {}
        data[key] = value
        f.seek(0)
        f.truncate()
        f.write(json.dumps(data, indent=2, sort_keys=True) + "\n")
