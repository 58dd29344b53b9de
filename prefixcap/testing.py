"""A conformance kit for plugin authors: the standard tests every encoder, connector or decoder should pass.

It is a pytest plugin. Enable it with ``pytest -p prefixcap.testing`` (or ``pytest_plugins = ["prefixcap.testing"]``
in your test module or top-level conftest.py), then subclass ComponentConformance once per component::

    from prefixcap.testing import ComponentConformance

    class TestMyDecoder(ComponentConformance):
        kind = "decoder"
        name = "my-decoder"
        options = {"checkpoint": "tiny"}   # its tiny/offline form: what the tests build
        distribution = "prefixcap-mydecoder"   # optional: found from the registration when not set
        exports_onnx = True                # claim: the prefix system built with it exports to ONNX

pytest collects the inherited tests (one class per component):

    test_registration_metadata      name, kind, distribution, version, description, "module:attr" factory, options
    test_registration_imports_no_torch   a fresh interpreter lists components and resolves this one without torch
    test_builds_from_its_tiny_form  prefixcap.create() builds it and it states its facts (dims, tokens, width)
    test_builds_without_weights_as_validate_does   pretrained=False on the meta device (what `prefixcap validate`
                                    does) builds, states the same facts and parameter counts as pretrained=True, and
                                    allocates no parameter; so do its default options (its real checkpoint)
    test_output_depends_on_its_input     an encoder's tokens change with the image; a connector's prefix with its
                                    tokens; a decoder's caption loss with the prefix, whose gradient reaches every
                                    prefix position, finite (not computed under no_grad, not detached)
    test_real_checkpoint_path       pretrained=True from the checkpoint its write_tiny_checkpoint writes (the way a
                                    user's hub checkpoint loads) and from the weights its default options ship (a
                                    package or bundled model on this machine): same facts as without weights, and
                                    the input checks above on the real weights
    test_tiny_form_is_the_real_architecture    `checkpoint: tiny` builds the same model class (and model_type) as
                                    its default checkpoint, wherever that one's config is readable offline
    test_shapes_with_builtin_partners    in a prefix system with the builtin partners: logits (B, T, V) and the
                                    facts hold (encoder (B, N, D), connector (B, K, H), decoder width H)
    test_one_training_step          AdamW on system.param_groups() moves trainable parameters only, and some
    test_save_load_round_trip       system.save + prefixcap.load: same tensors, logits and greedy captions
    test_onnx_export                prefixcap.export.export_system + OnnxCaptioner: same greedy captions as
                                    PyTorch, and OnnxScorer the same scores; skipped (with the reason) unless
                                    the class claims exports_onnx

Each test loads only the distribution under test and the prefixcap plugin distributions it requires (its
Requires-Dist), as PREFIXCAP_LOAD_PLUGINS would, and restores the registry afterwards: another installed plugin, even
one registering the same name or a broken one, never changes the result. The distribution is the class's
``distribution``, or else the one that registers the component; two that both register it must be told apart by
setting ``distribution``. Building with the weights the default options ship can be turned off with
``skip_real_weights = "why"`` (a model too big for the test machine); what a class did not check is listed at the
end of the run, under "prefixcap conformance kit".

The component under test takes its own slot of a prefix system; the other two slots are builtins in their tiny,
offline form (``partner_encoder``, ``partner_connector``, ``partner_decoder``: override them as class attributes).
Each test builds its own tiny system, so a test never sees another's training; the whole set takes 10-20 s per
component on 2 CPU cores, most of it the ONNX export. Two classes whose systems save to identical files (the same
recipe, seed and training) share one export: pairing components in a few systems exports each system once.
"""

from __future__ import annotations

import contextlib
import importlib.metadata as metadata
import json
import math
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, ClassVar, Iterator, NoReturn

import pytest

MARKER = "prefixcap_conformance"
KINDS = ("encoder", "connector", "decoder")  # the slots of a prefix system, which is what the kit builds
ENABLED = pytest.StashKey[bool]()
NOTES = pytest.StashKey[list[str]]()  # what classes did not check, listed at the end of the run
FACTORY_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
HEAVY = ("torch", "transformers")  # what a plugin module must not import (prefixcap/hookspecs.py)
ONNX_LOGITS_ATOL = 1e-4  # onnxruntime vs PyTorch on the same pixels; tests/test_export.py measured at most 4e-7
# Logits are compared relative to their scale: fp32 sums reordered by onnxruntime's kernels drift with depth and
# magnitude (the real SmolLM2-135M, 30 layers, logits up to 24: 1.8e-4, 7e-6 of the scale). A wrong or missing
# weight moves them by whole units (one step of LoRA left unmerged: 12).
ONNX_LOGITS_RTOL = 1e-4
LOAD_PLUGINS = "PREFIXCAP_LOAD_PLUGINS"
SELF_DIST = "prefixcap"
SHIPPED = ("package", "bundled")  # Need kinds of weights that come with an installed package, not from the hub
HUB = ("hub-model", "hub-dataset")
PREFIX_TOKENS = 4  # the prefix the decoder checks put in front of a caption


# Exports by the content of the saved system they came from. Exporting is most of the kit's time (torch.export of
# three graphs), and classes that build the very same system, as test suites pairing several components do, would
# export it once each: identical files make an identical export, so the second class checks the first one's.
_EXPORTS: dict[str, Path] = {}


def _saved_system_digest(directory: Path) -> str:
    """Hash of a System.save directory: every file's path and bytes, the manifest without its creation time."""
    import hashlib

    digest = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        data = path.read_bytes()
        if path.name == "manifest.json" and path.parent == directory:
            manifest = json.loads(data)
            manifest.pop("created", None)
            data = json.dumps(manifest, sort_keys=True).encode()
        digest.update(str(path.relative_to(directory)).encode() + b"\0" + data + b"\0")
    return digest.hexdigest()


def _fail(message: str) -> NoReturn:
    """A kit failure: the message says what to fix (and quotes the plugin's error), so pytest's traceback into the
    kit, and the plugin's exception printed again above it, would only hide it."""
    raise pytest.fail.Exception(message, pytrace=False) from None


def _error(e: BaseException) -> str:
    from prefixcap.errors import summary

    return f"{type(e).__name__}: {summary(e)}"


# --- the pytest plugin ------------------------------------------------------------------------------------------


def pytest_configure(config: pytest.Config) -> None:
    config.stash[ENABLED] = True
    config.addinivalue_line("markers", f"{MARKER}: a test of the prefixcap conformance kit (prefixcap.testing)")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Marked here rather than on the class: `pytest.mark.X` on the class would be evaluated when the test module
    # imports it, which can be before this plugin registers the marker (pytest_plugins in a module).
    for item in items:
        cls = getattr(item, "cls", None)
        if cls is not None and issubclass(cls, ComponentConformance):
            item.add_marker(MARKER)


def pytest_report_header(config: pytest.Config) -> list[str]:
    """Which plugins the kit sees: a component missing from the registry is most often a broken plugin module."""
    import prefixcap
    from prefixcap.registry import registry

    reg = registry()
    third = sorted({str(r.provider) for r in reg.list() if r.provider.dist != "prefixcap"})
    only = os.environ.get(LOAD_PLUGINS)
    lines = [f"prefixcap {prefixcap.__version__} conformance kit; third-party components from: {', '.join(third) or 'none'}"
             + (f" ({LOAD_PLUGINS}={only!r})" if only is not None else "")]  # fmt: skip
    return lines + [f"prefixcap broken plugin {b.provider.dist}:{b.provider.plugin}: {b.error}" for b in reg.broken]


def _note(config: pytest.Config, line: str) -> None:
    """Keep ``line`` for the end of the run, from pytest's own process or a pytest-xdist worker (whose lines travel
    back to the controller with the worker's output)."""
    if hasattr(config, "workeroutput"):
        config.workeroutput.setdefault("prefixcap_kit_notes", []).append(line)
    else:
        config.stash.setdefault(NOTES, []).append(line)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: Any) -> None:
    node.config.stash.setdefault(NOTES, []).extend(getattr(node, "workeroutput", {}).get("prefixcap_kit_notes", []))


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    notes = config.stash.get(NOTES, [])
    if notes:
        terminalreporter.section("prefixcap conformance kit: not checked")
        for line in notes:
            terminalreporter.write_line(line)


# --- which distributions a class loads ----------------------------------------------------------------------------


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _plugin_distributions() -> dict[str, str]:
    """Installed distributions with prefixcap plugins, prefixcap's own left out: normalised name -> name."""
    found: dict[str, str] = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"] or ""
        if _normalise(name) != SELF_DIST and dist.entry_points.select(group="prefixcap"):
            found.setdefault(_normalise(name), name)
    return found


def _with_requirements(dist: str, plugins: dict[str, str]) -> list[str]:
    """``dist`` and the prefixcap plugin distributions it requires (Requires-Dist, transitively, extras left out):
    what a user who installs it gets, and so what its components may use."""
    from packaging.requirements import InvalidRequirement, Requirement

    wanted: dict[str, str] = {}
    todo = [dist]
    while todo:
        name = todo.pop()
        if _normalise(name) in wanted:
            continue
        wanted[_normalise(name)] = plugins.get(_normalise(name), name)
        for line in metadata.requires(wanted[_normalise(name)]) or []:
            try:
                requirement = Requirement(line)
            except InvalidRequirement:
                continue
            if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
                continue
            if _normalise(requirement.name) in plugins:
                todo.append(requirement.name)
    return sorted(wanted.values(), key=_normalise)


@contextlib.contextmanager
def _plugins_loaded(value: str | None) -> Iterator[None]:
    """The registry loaded with PREFIXCAP_LOAD_PLUGINS set to ``value`` (None: unset, every installed plugin), and
    after the block, the variable and the registry as they were."""
    from prefixcap.registry import reload_registry

    def set_to(setting: str | None) -> None:
        if setting is None:
            os.environ.pop(LOAD_PLUGINS, None)
        else:
            os.environ[LOAD_PLUGINS] = setting
        reload_registry()

    before = os.environ.get(LOAD_PLUGINS)
    if before != value:
        set_to(value)
    try:
        yield
    finally:
        if before != value:
            set_to(before)


def _broken_hint(dists: set[str] | None = None) -> str:
    from prefixcap.registry import registry

    broken = [f"{b.provider.dist}: {b.error}" for b in registry().broken
              if dists is None or _normalise(b.provider.dist) in dists]  # fmt: skip
    return f" (broken plugins: {'; '.join(broken)})" if broken else ""


def _distribution_under_test(cls: type[ComponentConformance]) -> str:
    """The distribution a class tests: its ``distribution``, else the one registering its component, looked up in
    the registry as loaded now and then among every installed plugin."""
    from prefixcap.errors import PluginError, UnknownComponentError
    from prefixcap.registry import get_component

    where = f"{cls.__name__}: {cls.kind} {cls.name!r}"
    if cls.distribution:
        try:
            return metadata.distribution(cls.distribution).metadata["Name"]
        except metadata.PackageNotFoundError:
            _fail(f"{where}: distribution = {cls.distribution!r}, which is not installed; install it (`pip install "
                  f"-e .` in its folder) or set distribution to the name in its pyproject.toml")  # fmt: skip
    try:
        return get_component(cls.kind, cls.name).provider.dist
    except PluginError:
        pass
    with _plugins_loaded(None):
        try:
            return get_component(cls.kind, cls.name).provider.dist
        except UnknownComponentError as e:
            _fail(f"{where}: no installed distribution registers it: {e}{_broken_hint()}")
        except PluginError as e:  # registered by two distributions
            _fail(f"{cls.__name__}: {str(e).rstrip('.')}. Set distribution = '<the one under test>' on "
                  f"{cls.__name__}: the kit then loads only that distribution (and the prefixcap plugins it "
                  f"requires)")  # fmt: skip


_ISOLATION: dict[type, tuple[str, str]] = {}


def _isolation(cls: type[ComponentConformance]) -> tuple[str, str]:
    """(PREFIXCAP_LOAD_PLUGINS value that loads only what the class tests, the distribution under test)."""
    if cls not in _ISOLATION:
        dist = _distribution_under_test(cls)
        load = [] if _normalise(dist) == SELF_DIST else _with_requirements(dist, _plugin_distributions())
        _ISOLATION[cls] = (",".join(d for d in load if _normalise(d) != SELF_DIST), dist)
    return _ISOLATION[cls]


# --- checks shared by several tests -----------------------------------------------------------------------------


def facts(kind: str, part: Any, in_tokens: int | None = None) -> dict[str, Any]:
    """What compose() and `prefixcap validate` read from a built component (``in_tokens``: a connector's N)."""
    counts = {"parameters": sum(p.numel() for p in part.parameters()),
              "trainable parameters": sum(p.numel() for p in part.parameters() if p.requires_grad)}  # fmt: skip
    if kind == "encoder":
        return {"dim": part.dim, "num_tokens": part.num_tokens, **counts}
    if kind == "decoder":
        return {"hidden_size": part.hidden_size, "lora_targets": list(part.lora_targets), **counts}
    return {"in_dim": part.in_dim, "out_dim": part.out_dim, "output_tokens": part.output_tokens(in_tokens), **counts}


def architecture(part: Any) -> str:
    """The model class a component is made of: its transformers model (with its model_type), else the classes of its
    child modules (timm, open_clip or a plugin's own)."""
    from prefixcap.interfaces import transformers_model

    model = transformers_model(part)
    if model is not None:
        return f"{type(model).__name__} (model_type {model.config.model_type!r})"
    return " + ".join(type(child).__name__ for child in part.children()) or type(part).__name__


def check_encoder_reads_its_image(encoder: Any, what: str) -> None:
    """Two noise images, and a blank one, give three different sets of tokens."""
    import numpy as np
    import torch
    from PIL import Image

    side = encoder.preprocessing.size
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)) for _ in range(2)]
    images.append(Image.new("RGB", (side, side), (128, 128, 128)))
    with torch.no_grad():
        tokens = encoder.eval()(encoder.preprocess(images)).float()
    if not torch.isfinite(tokens).all():
        _fail(f"{what} gives non-finite tokens for ordinary images: check its forward")
    for (i, j), pair in (((0, 1), "two different noise images"), ((0, 2), "a noise image and a blank grey one")):
        if torch.allclose(tokens[i], tokens[j], rtol=1e-4, atol=1e-6):
            _fail(f"{what} gives the same tokens for {pair}: its forward must compute them from pixel_values (does "
                  f"it scale them to zero, or return something that does not depend on them?)")  # fmt: skip


def check_connector_reads_its_tokens(connector: Any, in_tokens: int, what: str) -> None:
    """Two sets of visual tokens give two different prefixes, and gradient flows back to the tokens."""
    import torch

    generator = torch.Generator().manual_seed(0)
    tokens = torch.randn(2, in_tokens, connector.in_dim, generator=generator).requires_grad_()
    prefix = connector.eval()(tokens)
    if not torch.isfinite(prefix).all():
        _fail(f"{what} gives a non-finite prefix for normal random tokens: check its forward")
    if torch.allclose(prefix[0], prefix[1], rtol=1e-4, atol=1e-6):
        _fail(f"{what} gives the same prefix for two different sets of visual tokens: its forward must compute the "
              f"prefix from its tokens")  # fmt: skip
    if not prefix.requires_grad:
        _fail(f"{what} gives a prefix without autograd (computed under torch.no_grad() or from detached tensors): "
              f"nothing in it could be trained; compute forward with autograd on")  # fmt: skip
    probe = torch.randn(prefix.shape, generator=generator)  # a random direction: a final LayerNorm sums to constants
    (grad,) = torch.autograd.grad((prefix.float() * probe).sum(), tokens, allow_unused=True)
    if grad is None or not grad.any() or not torch.isfinite(grad).all():
        _fail(f"{what} passes {'no' if grad is None or not grad.any() else 'a non-finite'} gradient back to its "
              f"tokens: its forward detaches them, so an encoder with unfrozen blocks could not learn")  # fmt: skip


def check_decoder_reads_its_prefix(decoder: Any, captions: list[str], what: str) -> None:
    """The caption cross-entropy with a prefix in front (as the prefix system computes it) changes with the prefix,
    and its gradient reaches every prefix position and is finite: what trains the connector."""
    import torch
    from torch.nn import functional as F

    decoder.eval()  # no dropout: two prefixes are compared, not two dropout masks
    if decoder.tokenizer is None:
        _fail(f"{what} has no tokenizer: built with pretrained=True it must have one, or it cannot caption")
    input_ids, mask, labels = decoder.tokenize(captions, 16)
    (b, t), k = input_ids.shape, PREFIX_TOKENS
    with torch.no_grad():
        scale = decoder.embed(input_ids).float().pow(2).mean().sqrt()  # a prefix at the scale of the embeddings

    def loss_of(prefix: Any) -> Any:
        text = decoder.embed(input_ids)  # (B, T, H)
        inputs = torch.cat([prefix.to(text.dtype), text], dim=1)  # (B, K + T, H)
        logits = decoder(inputs, torch.cat([mask.new_ones(b, k), mask], dim=1), num_logits=t + 1)[:, :-1]
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)

    generator = torch.Generator().manual_seed(0)
    first = (torch.randn(b, k, decoder.hidden_size, generator=generator) * scale).requires_grad_()
    second = torch.randn(b, k, decoder.hidden_size, generator=generator) * scale
    loss = loss_of(first)
    if not torch.isfinite(loss):
        _fail(f"{what} gives a non-finite caption loss ({loss.item()}) with a prefix in front: check its forward")
    if not loss.requires_grad:
        _fail(f"{what} computes its logits without autograd (under torch.no_grad() or torch.inference_mode(), or "
              f"from detached tensors): the caption loss has no gradient, so the connector before it never learns; "
              f"compute forward with autograd on")  # fmt: skip
    (grad,) = torch.autograd.grad(loss, first, allow_unused=True)
    if grad is None or not grad.any():
        _fail(f"the caption loss of {what} has no gradient with respect to the prefix: its forward detaches "
              f"inputs_embeds or does not use them, so the connector never learns; pass inputs_embeds to the model "
              f"as they come")  # fmt: skip
    if not torch.isfinite(grad).all():
        _fail(f"the caption loss of {what} has a non-finite gradient with respect to the prefix: check its forward")
    dead = [i for i in range(k) if not grad[:, i].any()]
    if dead:
        _fail(f"the caption loss of {what} has no gradient with respect to prefix positions {dead} of {k}: its "
              f"forward ignores them (does it cut inputs_embeds or attention_mask down to the last num_logits "
              f"positions? num_logits only says how many positions need logits)")  # fmt: skip
    with torch.no_grad():
        other = loss_of(second)
    if abs(loss.item() - other.item()) <= 1e-6 * max(1.0, abs(loss.item())):
        _fail(f"the caption loss of {what} is the same for two different prefixes: its forward must condition the "
              f"logits on the whole inputs_embeds")  # fmt: skip


# --- the tests --------------------------------------------------------------------------------------------------


class ComponentConformance:
    """Subclass as ``Test...`` and set ``kind``, ``name`` and ``options``; see the module docstring."""

    kind: ClassVar[str] = ""  # "encoder", "connector" or "decoder"
    name: ClassVar[str] = ""  # its registered name
    options: ClassVar[dict[str, Any]] = {}  # recipe options of its tiny/offline form (no network, small, random ok)
    exports_onnx: ClassVar[bool] = False  # claim that a prefix system with it exports to ONNX (tested when True)
    distribution: ClassVar[str | None] = None  # the distribution that provides it (default: the one registering it)
    # A reason not to build it with the weights its default options ship (a package or bundled model too big for
    # the machine the kit runs on); None builds it. Listed at the end of the run.
    skip_real_weights: ClassVar[str | None] = None

    # The builtin partners that fill the other two slots.
    partner_encoder: ClassVar[dict[str, Any]] = {"name": "siglip", "checkpoint": "tiny"}
    partner_connector: ClassVar[dict[str, Any]] = {"name": "mlp", "hidden": 32, "dropout": 0.0}
    # One layer: the decoder graph's export is most of the ONNX test's time, and grows with the layers.
    partner_decoder: ClassVar[dict[str, Any]] = {"name": "smollm", "checkpoint": "tiny", "tiny": {"num_hidden_layers": 1},
                                                 "lora": {"r": 4, "dropout": 0.0}}  # fmt: skip

    num_images: ClassVar[int] = 4
    captions: ClassVar[tuple[str, ...]] = ("a red circle", "a blue square on the left and a green triangle",
                                           "two yellow circles", "a small purple star on the right")  # fmt: skip
    max_new_tokens: ClassVar[int] = 8
    seed: ClassVar[int] = 0
    lr: ClassVar[float] = 1e-2  # for param groups that do not set their own

    @pytest.fixture(autouse=True)
    def _conformance_setup(self, request: pytest.FixtureRequest):
        if not request.config.stash.get(ENABLED, False):
            pytest.fail("ComponentConformance needs its pytest plugin: run `pytest -p prefixcap.testing`, or add "
                        "pytest_plugins = ['prefixcap.testing'] to the test module or the top-level conftest.py",
                        pytrace=False)  # fmt: skip
        if self.kind not in KINDS or not self.name:
            pytest.fail(f"{type(self).__name__} must set kind (one of {', '.join(KINDS)}) and name; "
                        f"got kind={self.kind!r}, name={self.name!r}", pytrace=False)  # fmt: skip
        import torch

        from prefixcap.registry import reload_registry

        self._config = request.config
        load, dist = _isolation(type(self))
        with _plugins_loaded(load):
            if not self._provided_by(dist):  # the variable was already set, but the registry loaded before it was
                reload_registry()
                if not self._provided_by(dist):
                    _fail(f"{type(self).__name__}: {dist} does not register {self.kind} {self.name!r}"
                          f"{_broken_hint({_normalise(dist)})}")  # fmt: skip
            # Tiny models run fastest on one thread; with more, threads spin-wait for each other whenever another
            # job holds a core, which made a 1 s test take a minute on a shared 2-core machine.
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                yield
            finally:
                torch.set_num_threads(threads)

    def _provided_by(self, dist: str) -> bool:
        from prefixcap.errors import PluginError
        from prefixcap.registry import get_component

        try:
            return _normalise(get_component(self.kind, self.name).provider.dist) == _normalise(dist)
        except PluginError:
            return False

    # -- helpers (not tests): override to change how the kit builds things

    def spec(self) -> dict[str, Any]:
        """The component under test as a recipe section."""
        return {"name": self.name, **self.options}

    def recipe(self) -> dict[str, Any]:
        """A prefix system: the component in its slot, the builtin partners in the others."""
        slots = {"encoder": self.partner_encoder, "connector": self.partner_connector, "decoder": self.partner_decoder}
        return {"system": "prefix", **slots, self.kind: self.spec(), "losses": [{"name": "caption-ce"}],
                "generate": {"max_new_tokens": self.max_new_tokens}}  # fmt: skip

    def compose_system(self) -> Any:
        import torch

        import prefixcap

        torch.manual_seed(self.seed)
        return prefixcap.compose(self.recipe())

    def images(self, system: Any) -> list[Any]:
        """Fixed noise images at the side the encoder resizes to before its centre crop: neither PyTorch nor the
        ONNX captioner resamples them, so both see the same pixels and captions can be compared token for token."""
        import numpy as np
        from PIL import Image

        processor = system.encoder.preprocessing
        side = processor.size if processor.resize == "letterbox" else math.floor(processor.size / processor.crop_pct)
        rng = np.random.default_rng(self.seed)
        return [Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)) for _ in range(self.num_images)]

    def batch(self, system: Any) -> Any:
        captions = [self.captions[i % len(self.captions)] for i in range(self.num_images)]
        return system.make_batch(self.images(system), captions, max_tokens=16)

    def train_step(self, system: Any, batch: Any) -> None:
        """One AdamW step on the system's param groups. No weight decay: a parameter moves only through its
        gradient, so "frozen parameters do not move" is exact."""
        import torch

        groups = [{"params": g.params, "lr": g.lr or self.lr} for g in system.param_groups()]
        optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
        system.train()
        loss, _ = system.loss(batch)
        assert torch.isfinite(loss), f"training loss is {loss.item()}"
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        system.eval()

    def part(self, system: Any) -> Any:
        return getattr(system, self.kind)

    def build(self, spec: dict[str, Any], *, pretrained: bool = True, kind: str | None = None) -> Any:
        """One component from a recipe section, as compose() builds it (a connector between the partners' widths)."""
        from prefixcap import create

        kind = kind or self.kind
        options = {k: v for k, v in spec.items() if k != "name"}
        if kind != "connector":
            return create(kind, spec["name"], options, pretrained=pretrained)
        encoder, decoder = self.partners()
        return create(kind, spec["name"], options, in_dim=encoder.dim, out_dim=decoder.hidden_size,
                      in_tokens=encoder.num_tokens)  # fmt: skip

    def partners(self) -> tuple[Any, Any]:
        """The partner encoder and decoder a connector sits between (built once per test)."""
        if not hasattr(self, "_partners"):
            self._partners = (self.build(self.partner_encoder, kind="encoder"),
                              self.build(self.partner_decoder, kind="decoder"))  # fmt: skip
        return self._partners

    def in_tokens(self) -> int | None:
        return self.partners()[0].num_tokens if self.kind == "connector" else None

    def check_reads_its_input(self, part: Any, what: str) -> None:
        if self.kind == "encoder":
            check_encoder_reads_its_image(part, what)
        elif self.kind == "connector":
            check_connector_reads_its_tokens(part, self.in_tokens(), what)
        else:
            check_decoder_reads_its_prefix(part, list(self.captions[:2]), what)

    def default_spec(self) -> dict[str, Any] | None:
        """Its default options, i.e. its real checkpoint, as a recipe section: the class's options without their
        checkpoint; None when they name none (they are the default already) or the component requires one."""
        from pydantic import ValidationError

        from prefixcap.registry import get_component

        if "checkpoint" not in self.options:
            return None
        spec = {"name": self.name, **{k: v for k, v in self.options.items() if k != "checkpoint"}}
        try:
            get_component(self.kind, self.name).parse_options({k: v for k, v in spec.items() if k != "name"})
        except ValidationError:
            return None
        return spec

    def build_without_weights(self, spec: dict[str, Any], what: str) -> Any:
        """``spec`` built as `prefixcap validate` builds it: pretrained=False on the meta device."""
        import torch

        reg = self.registration()
        if self.kind == "connector":
            self.partners()  # in memory: a connector's widths come from partners built with their weights
        try:
            with torch.device("meta"):
                part = self.build(spec, pretrained=False)
        except Exception as e:
            _fail(f"prefixcap validate builds your component with pretrained=False on the meta device: {what} "
                  f"raised {_error(e)}; make {reg.factory} build the architecture alone when pretrained=False (a "
                  f"config, no weights read), creating tensors on the current default device")  # fmt: skip
        real = [n for n, p in part.named_parameters() if p.device.type != "meta"]
        if real:
            _fail(f"prefixcap validate builds your component on the meta device, but with pretrained=False {what} "
                  f"put {len(real)} parameters in memory (e.g. {real[0]}): create them on the current default "
                  f"device (no device= argument), so that checking a large recipe costs nothing")  # fmt: skip
        return part

    def default_without_weights(self, default: dict[str, Any]) -> tuple[Any, list[str]]:
        """The component of its default options built as validate builds it, and []; or None and the hub models whose
        absence from this machine is the only reason it could not be (its config is there): a note, not a failure."""
        try:
            return self.build_without_weights(default, f"its default options {default}"), []
        except pytest.fail.Exception:
            missing = self.missing_hub_needs(default)
            if not missing:
                raise
            return None, missing

    def missing_hub_needs(self, spec: dict[str, Any]) -> list[str]:
        """Hub models or data sets ``spec`` reads that are not on this machine (where they come from, for a note)."""
        from prefixcap.doctor import find
        from prefixcap.registry import get_component

        options = get_component(self.kind, self.name).parse_options({k: v for k, v in spec.items() if k != "name"})
        found = [(need, find(need)) for need in options.needs() if need.kind in HUB]
        return [f"{need.name} ({where.detail})" for need, where in found if where.status == "missing"]

    def registration(self) -> Any:
        from prefixcap.registry import get_component

        return get_component(self.kind, self.name)

    def note(self, line: str) -> None:
        """Say, at the end of the run, what this class could not check."""
        _note(self._config, f"{type(self).__name__}: {line}")

    # -- the standard tests

    def test_registration_metadata(self):
        from pydantic import ValidationError

        from prefixcap.registry import ComponentOptions, get_component, registry

        reg = get_component(self.kind, self.name)
        assert (reg.kind, reg.name) == (self.kind, self.name)
        assert reg.provider.dist and reg.provider.version and reg.provider.plugin, f"incomplete provider {reg.provider}"
        if self.distribution is not None:
            assert _normalise(reg.provider.dist) == _normalise(self.distribution), \
                f"provided by {reg.provider}, not {self.distribution}"  # fmt: skip
        assert reg.description.strip(), "no description: `prefixcap plugins` shows it, give one line"
        assert FACTORY_RE.match(reg.factory), f"factory {reg.factory!r} is not 'module:attribute'"
        assert issubclass(reg.options, ComponentOptions)
        reg.parse_options(self.options)  # the tiny form is valid recipe options
        with pytest.raises(ValidationError):  # a typo in a recipe must be an error, not a silent default
            reg.parse_options({**self.options, "no_such_option": 1})
        broken = [b.error for b in registry().broken if b.provider.dist == reg.provider.dist]
        assert not broken, f"{reg.provider.dist} has broken plugin modules: {broken}"

    def test_registration_imports_no_torch(self):
        """`prefixcap plugins` and recipe checking list components without torch; a plugin module that imports it
        makes every prefixcap command slow. A fresh interpreter, with this one's import path and environment."""
        script = textwrap.dedent("""
            import json, sys
            from prefixcap.registry import get_component, list_components
            kind, name, options = json.loads(sys.argv[1])
            assert (kind, name) in {(r.kind, r.name) for r in list_components()}, f"{kind} {name!r} is not listed"
            get_component(kind, name).parse_options(options)
            print(json.dumps([m for m in sys.argv[2:] if m in sys.modules]))
        """)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        args = [json.dumps([self.kind, self.name, self.options]), *HEAVY]
        done = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, env=env,
                              timeout=120)  # fmt: skip
        assert done.returncode == 0, done.stderr
        imported = json.loads(done.stdout.strip().splitlines()[-1])
        assert imported == [], (f"listing components and resolving {self.kind} {self.name!r} imported {imported}: "
                                f"import them in the factory's module, not in the plugin module or the options "
                                f"model")  # fmt: skip

    def test_builds_from_its_tiny_form(self):
        import torch

        from prefixcap.images import ImageProcessor
        from prefixcap.interfaces import Connector, Decoder, Encoder

        torch.manual_seed(self.seed)
        part = self.build(self.spec())
        if self.kind == "encoder":
            assert isinstance(part, Encoder)
            assert part.dim > 0 and part.num_tokens > 0
            assert isinstance(part.image_processor, ImageProcessor) and part.image_processor.size > 0
        elif self.kind == "decoder":
            assert isinstance(part, Decoder) and part.hidden_size > 0
            assert part.tokenizer is not None, "the tiny form must have a tokenizer, or it cannot caption"
            prompt = part.prompt_ids()
            assert prompt.ndim == 1 and prompt.dtype == torch.long
        else:
            encoder, decoder = self.partners()
            assert isinstance(part, Connector)
            assert (part.in_dim, part.out_dim) == (encoder.dim, decoder.hidden_size)
            assert part.output_tokens(encoder.num_tokens) > 0

    def test_builds_without_weights_as_validate_does(self):
        """`prefixcap validate` (compose(weights="none")) builds each component with pretrained=False on the meta
        device and reports what it states; it must be what the weights will be loaded into."""
        import torch

        spec = self.spec()
        meta = self.build_without_weights(spec, f"{spec}")
        torch.manual_seed(self.seed)
        built = self.build(spec)
        without, loaded = facts(self.kind, meta, self.in_tokens()), facts(self.kind, built, self.in_tokens())
        if without != loaded:
            differ = {k: (without[k], loaded[k]) for k in without if without[k] != loaded[k]}
            _fail(f"{spec} states other facts built with pretrained=False (what `prefixcap validate` reports) than "
                  f"with pretrained=True: {', '.join(f'{k} {a} vs {b}' for k, (a, b) in differ.items())}; "
                  f"{self.registration().factory} must build the same architecture, from the same config, either "
                  f"way")  # fmt: skip
        default = self.default_spec()
        if default is None:
            return
        _, missing = self.default_without_weights(default)
        if missing:
            self.note(f"not built without weights from its default options {default}: its config would come "
                      f"from the hub ({'; '.join(missing)})")  # fmt: skip

    def test_output_depends_on_its_input(self):
        """An encoder that ignores its image, a connector its tokens or a decoder its prefix trains and captions
        without error; only its input dependence shows the bug."""
        import torch

        torch.manual_seed(self.seed)
        self.check_reads_its_input(self.build(self.spec()), f"{self.kind} {self.name!r} built from {self.spec()}")

    def test_real_checkpoint_path(self, tmp_path: Path):
        """pretrained=True from a checkpoint on disk, which the tiny form (``checkpoint: tiny``, built in memory)
        never exercises: from the one its write_tiny_checkpoint writes, and from the weights it ships."""
        import torch

        reg = self.registration()
        factory = reg.load_factory()
        checked, unchecked = [], []
        writer = getattr(factory, "write_tiny_checkpoint", None)
        if writer is not None:
            options = reg.parse_options(self.options)
            try:
                written = writer(tmp_path / "tiny-checkpoint", options)
            except Exception as e:
                _fail(f"{reg.factory}.write_tiny_checkpoint(directory, options) raised {_error(e)}")
            if not isinstance(written, dict):
                _fail(f"{reg.factory}.write_tiny_checkpoint(directory, options) returned {written!r}: it must return "
                      f"the recipe options that load what it wrote, e.g. {{'checkpoint': str(directory)}}")  # fmt: skip
            self.check_real_build({**self.spec(), **written}, f"the tiny checkpoint its write_tiny_checkpoint wrote "
                                  f"({written})")  # fmt: skip
            checked.append("a tiny checkpoint")
        else:
            unchecked.append(f"{reg.factory} has no write_tiny_checkpoint(directory, options)")
        shipped, why = self.shipped_weights()
        if shipped is not None and self.skip_real_weights:
            self.note(f"not built with the weights its default options ship ({why}): {self.skip_real_weights}")
            unchecked.append(f"skip_real_weights: {self.skip_real_weights}")
        elif shipped is not None:
            torch.manual_seed(self.seed)
            self.check_real_build(shipped, f"the weights its default options ship ({why})")
            checked.append("shipped weights")
        else:
            unchecked.append(why)
        if not checked:
            pytest.skip(f"{self.kind} {self.name!r} has no checkpoint on disk to load: {'; '.join(unchecked)}")

    def shipped_weights(self) -> tuple[dict[str, Any] | None, str]:
        """(recipe section of its default options, what they read) when they read only weights that come with an
        installed package or with prefixcap, all on this machine; else (None, why not)."""
        from pydantic import ValidationError

        from prefixcap.doctor import find

        reg = self.registration()
        spec = self.default_spec() or self.spec()
        try:
            needs = reg.parse_options({k: v for k, v in spec.items() if k != "name"}).needs()
        except ValidationError:
            return None, "its options have no default checkpoint"
        if not needs or any(n.kind not in SHIPPED for n in needs):
            kinds = ", ".join(sorted({n.kind for n in needs})) or "nothing"
            return None, f"its default options read {kinds}, no weights that come with an installed package"
        found = {n.name: find(n) for n in needs}
        missing = [f"{name}: {f.detail}" + (f" ({f.fix})" if f.fix else "") for name, f in found.items()
                   if f.status != "present"]  # fmt: skip
        if missing:
            self.note(f"not built with the weights its default options ship, which are not installed: "
                      f"{'; '.join(missing)}")  # fmt: skip
            return None, f"the weights its default options ship are not installed ({'; '.join(missing)})"
        return spec, ", ".join(found)

    def check_real_build(self, spec: dict[str, Any], what: str) -> None:
        """Build ``spec`` with pretrained=True, check it states what its build without weights states, and that it
        reads its input."""
        factory = self.registration().factory
        try:
            part = self.build(spec)
        except Exception as e:
            _fail(f"{self.kind} {self.name!r} built with pretrained=True from {what} raised {_error(e)}: that is how "
                  f"a user's checkpoint loads; fix the pretrained=True path of {factory}")  # fmt: skip
        meta = self.build_without_weights(spec, f"{what}")
        loaded, without = facts(self.kind, part, self.in_tokens()), facts(self.kind, meta, self.in_tokens())
        if loaded != without:
            differ = ", ".join(f"{k} {without[k]} vs {loaded[k]}" for k in loaded if loaded[k] != without[k])
            _fail(f"built from {what}, {self.kind} {self.name!r} states other facts with pretrained=False (what "
                  f"`prefixcap validate` reports) than with pretrained=True: {differ}; {factory} must read the "
                  f"architecture from the same config either way")  # fmt: skip
        self.check_reads_its_input(part, f"{self.kind} {self.name!r} built from {what}")

    def test_tiny_form_is_the_real_architecture(self):
        """The kit, and a plugin's own tests, run `checkpoint: tiny`: if it is another model class than the default
        checkpoint's, they test an architecture users never get."""
        from pydantic import ValidationError

        from prefixcap.checkpoints import TINY

        reg = self.registration()
        if "checkpoint" not in reg.options.model_fields:
            pytest.skip(f"{self.kind} {self.name!r} has no checkpoint option, so no tiny form")
        base = {k: v for k, v in self.options.items() if k != "checkpoint"}
        try:
            tiny_options = reg.parse_options({**base, "checkpoint": TINY})
            default_options = reg.parse_options(base)
        except ValidationError as e:
            pytest.skip(f"{self.kind} {self.name!r} has no tiny form and default checkpoint to compare: {e}")
        if any(n.kind != "nothing" for n in tiny_options.needs()):
            pytest.skip(f"`checkpoint: {TINY}` is no tiny form of {self.kind} {self.name!r}: it reads "
                        f"{', '.join(f'{n.kind} {n.name!r}' for n in tiny_options.needs())}")  # fmt: skip
        tiny = self.build_without_weights({"name": self.name, **base, "checkpoint": TINY}, "`checkpoint: tiny`")
        default = {"name": self.name, **base}
        real, missing = self.default_without_weights(default)
        if missing:
            self.note(f"`checkpoint: tiny` not compared with the default checkpoint, whose config is not on this "
                      f"machine ({'; '.join(missing)})")  # fmt: skip
            pytest.skip(f"the default checkpoint's config is not on this machine: {'; '.join(missing)}")
        small, large = architecture(tiny), architecture(real)
        if small != large:
            from prefixcap.interfaces import transformers_model

            checkpoint = getattr(default_options, "checkpoint", None)
            model = transformers_model(real)
            hint = (f" (a decoder on prefixcap's CausalLMDecoder: its options' tiny_config() returns "
                    f"{{'model_type': {model.config.model_type!r}}}, see docs/writing-a-plugin.md)"
                    if model is not None else "")  # fmt: skip
            _fail(f"`checkpoint: tiny` builds a {small}, but the default checkpoint {checkpoint!r} is a {large}: the "
                  f"tiny form must be a small random model of the same class, or every test of it tests another "
                  f"architecture than users get; build the tiny form from the default checkpoint's "
                  f"architecture{hint}")  # fmt: skip

    def test_shapes_with_builtin_partners(self):
        import torch

        system = self.compose_system().eval()
        encoder, connector, decoder = system.encoder, system.connector, system.decoder
        batch = self.batch(system)
        b, t = batch.input_ids.shape
        size = encoder.preprocessing.size
        assert batch.pixel_values.shape == (b, 3, size, size)
        with torch.no_grad():
            tokens = encoder(batch.pixel_values)
            assert tokens.shape == (b, encoder.num_tokens, encoder.dim), "encoder output is not (B, num_tokens, dim)"
            k = connector.output_tokens(encoder.num_tokens)
            assert (connector.in_dim, connector.out_dim) == (encoder.dim, decoder.hidden_size)
            assert connector(tokens).shape == (b, k, decoder.hidden_size), "connector output is not (B, K, H)"
            assert system.num_prefix_tokens == k
            assert decoder.embed(batch.input_ids).shape == (b, t, decoder.hidden_size)
            out = system(batch)
        assert out.logits.ndim == 3 and out.logits.shape[:2] == (b, t), "logits are not (B, T, V)"
        assert out.logits.shape[2] >= len(decoder.tokenizer), "some token ids of the tokenizer have no logit"
        assert torch.isfinite(out.logits).all()

    def test_one_training_step(self):
        import torch

        system = self.compose_system()
        batch = self.batch(system)
        in_groups = {id(p) for g in system.param_groups() for p in g.params}
        trainable = {id(p) for p in system.parameters() if p.requires_grad}
        assert in_groups == trainable, "param_groups() must hold exactly the parameters that require grad"
        before = {n: p.detach().clone() for n, p in system.named_parameters()}
        self.train_step(system, batch)
        moved = {n for n, p in system.named_parameters() if not torch.equal(before[n], p.detach())}
        frozen_moved = sorted(n for n, p in system.named_parameters() if n in moved and id(p) not in trainable)
        assert not frozen_moved, f"frozen parameters changed: {frozen_moved[:5]}"
        assert moved, "one training step changed no parameter"
        own = [n for n, p in self.part(system).named_parameters(prefix=self.kind) if p.requires_grad]
        if own:  # a frozen component (the usual encoder) trains nothing itself
            assert moved & set(own), f"the {self.kind} has trainable parameters but none of them changed"

    def test_learns_and_scores_image_text_pairs(self):
        """The itc loss trains through this component and `prefixcap score` scores with it, as with the builtins: both
        score types, finite, for every (image, text) pair, and the same whether the texts are scored together or one
        at a time (padding never leaks into a score)."""
        import numpy as np
        import torch

        import prefixcap

        torch.manual_seed(self.seed)
        system = prefixcap.compose({**self.recipe(), "losses": [{"name": "caption-ce"}, {"name": "itc", "dim": 8}]})
        self.train_step(system, self.batch(system))
        images, texts = self.images(system)[:2], [self.captions[0], f"{self.captions[-1]} and one more thing"]
        together, alone = system.score(images, texts), system.score(images, texts, batch_size=1)
        for kind in ("generative", "contrastive"):
            assert together.of(kind).shape == (2, 2) and np.isfinite(together.of(kind)).all(), f"{kind} scores"
            np.testing.assert_allclose(together.of(kind), alone.of(kind), atol=1e-4,
                                       err_msg=f"{kind} scores change with the other texts in the batch")  # fmt: skip

    def test_explains_its_captions(self):
        """`prefixcap explain` works through this component as through the builtins: by gradient always (a map per
        caption token on the encoder's patch grid, Encoder.patch_grid, each summing to 1), and by attention when the
        system can say where its decoder looks (Decoder.attentions, Connector.source_weights), else refused with the
        method it lacks named (docs/writing-a-plugin.md, Explaining)."""
        import torch

        from prefixcap.explain import ExplainError, explain

        torch.manual_seed(self.seed)
        system = self.compose_system()
        images = self.images(system)[:2]
        first, rows, cols = system.encoder.patch_grid
        assert first >= 0 and rows * cols + first <= system.encoder.num_tokens, "patch_grid lies outside the tokens"
        for method in ("gradient", "attention"):
            try:
                found = explain(system, images, method, captions=list(self.captions[:2]))
            except ExplainError as e:
                named = any(f"{part}." in str(e) for part in ("System", "Connector", "Decoder", "Encoder"))
                assert method == "attention" and named, f"--method {method} refused without naming what is missing: {e}"
                continue
            for explanation in found:
                maps = explanation.word_maps()
                assert explanation.grid == (rows, cols) and len(maps) == len(explanation.words) > 0, method
                assert torch.allclose(maps.sum((-2, -1)), torch.ones(len(maps)), atol=1e-4), f"{method} maps"

    def test_language_adapter(self, tmp_path: Path):
        """A decoder takes language adapters as the builtins do (prefixcap.languages; the Decoder defaults work on the
        transformers model inside): English unchanged bit for bit once one is added, the language switched per call,
        and both back the same from a save."""
        if self.kind != "decoder":
            pytest.skip("language adapters are a decoder's (Decoder.add_language)")
        import torch

        import prefixcap
        from prefixcap.config import LanguageConfig

        system = self.compose_system()
        batch = self.batch(system)
        self.train_step(system, batch)
        images = self.images(system)
        english = system.caption(images)
        with torch.no_grad():
            logits = system(batch).logits
        ids = batch.input_ids[batch.labels >= 0].unique().tolist()
        system.decoder.add_language(LanguageConfig(name="de", r=2, mlp_r=2), ids)
        generator = torch.Generator().manual_seed(self.seed)
        with torch.no_grad():  # as if trained: LoRA's B starts at zero, which would change nothing
            for p in system.decoder.language_parameters("de"):
                p.add_(torch.randn(p.shape, generator=generator) * 0.1)
            assert torch.equal(system(batch).logits, logits), "adding a language changed English"
            with system.speaking("de"):
                german = system(batch).logits
        assert not torch.equal(german, logits), "the language adapter changes nothing"
        assert system.caption(images) == english
        system.save(tmp_path / "saved")
        loaded = prefixcap.load(tmp_path / "saved")
        assert loaded.languages == ["de"] and loaded.caption(images) == english
        with torch.no_grad(), loaded.speaking("de"):
            torch.testing.assert_close(loaded(batch).logits, german)
        assert loaded.caption(images, lang="de") == system.caption(images, lang="de")

    def test_save_load_round_trip(self, tmp_path: Path):
        import torch

        import prefixcap

        system = self.compose_system()
        batch = self.batch(system)
        self.train_step(system, batch)  # trained weights differ from a fresh build (LoRA B is no longer zero)
        images = self.images(system)
        captions = system.caption(images)
        with torch.no_grad():
            logits = system(batch).logits
        system.save(tmp_path / "saved")
        torch.manual_seed(self.seed + 1)  # a different random init underneath: everything must come from the files
        loaded = prefixcap.load(tmp_path / "saved")
        saved_state, loaded_state = system.state_dict(), loaded.state_dict()
        assert set(loaded_state) == set(saved_state)
        differ = [n for n, v in saved_state.items() if not torch.equal(v, loaded_state[n])]
        assert not differ, f"loaded tensors differ from the saved system's: {differ[:5]}"
        with torch.no_grad():
            torch.testing.assert_close(loaded(batch).logits, logits)
        assert loaded.caption(images) == captions

    def test_onnx_export(self, tmp_path: Path):
        if not self.exports_onnx:
            pytest.skip(f"{type(self).__name__} does not claim that a prefix system with {self.kind} {self.name!r} "
                        f"exports to ONNX (set exports_onnx = True to test it)")  # fmt: skip
        import numpy as np
        import torch

        import prefixcap
        from prefixcap.export import export_system
        from prefixcap.onnx_captioner import OnnxCaptioner

        system = self.compose_system()
        self.train_step(system, self.batch(system))  # so the LoRA merge and trained connector weights matter
        system.save(tmp_path / "saved")
        digest = _saved_system_digest(tmp_path / "saved")
        onnx_dir = _EXPORTS.get(digest)
        if onnx_dir is None or not (onnx_dir / "manifest.json").is_file():
            onnx_dir = tmp_path / "onnx"
            export_system(tmp_path / "saved", onnx_dir)
            _EXPORTS[digest] = onnx_dir
        loaded = prefixcap.load(tmp_path / "saved")  # what export_system exported
        captioner = OnnxCaptioner(onnx_dir, threads=1)
        images = self.images(loaded)
        pixels = captioner.pixel_values(images)
        assert np.abs(pixels - loaded.encoder.preprocess(images).numpy()).max() <= 1e-6, "preprocessing differs"
        logits, _ = captioner.start(pixels)
        with torch.no_grad():
            inputs = loaded.generation_inputs(torch.from_numpy(pixels))
            mask = torch.ones(inputs.shape[:2], dtype=torch.long)
            reference = loaded.decoder(inputs, mask, num_logits=1)[:, -1].float().numpy()
        tolerance = ONNX_LOGITS_RTOL * max(1.0, float(np.abs(reference).max()))
        assert np.abs(logits - reference).max() < tolerance, "first-step logits differ from PyTorch's"
        assert captioner.caption(images) == loaded.caption(images)
        if json.loads((onnx_dir / "manifest.json").read_text())["scoring"] is not None:  # else export warned why
            from prefixcap.onnx_scorer import OnnxScorer
            from prefixcap.score import TorchScorer

            texts = ["a red circle", "  two small blue squares, left of it  "]
            scorers = (OnnxScorer(onnx_dir, threads=1), TorchScorer(loaded))
            got, want = (scorer.score(scorer.prepare(images), texts) for scorer in scorers)
            assert set(got) == set(want), "the ONNX export scores other kinds than PyTorch"
            for kind in want:
                assert np.abs(got[kind] - want[kind]).max() < ONNX_LOGITS_ATOL, f"ONNX {kind} scores differ"
