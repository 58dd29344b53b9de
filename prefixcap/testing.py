"""A conformance kit for plugin authors: the standard tests every encoder, connector or decoder should pass.

It is a pytest plugin. Enable it with ``pytest -p prefixcap.testing`` (or ``pytest_plugins = ["prefixcap.testing"]``
in your test module or top-level conftest.py), then subclass ComponentConformance once per component::

    from prefixcap.testing import ComponentConformance

    class TestMyDecoder(ComponentConformance):
        kind = "decoder"
        name = "my-decoder"
        options = {"checkpoint": "tiny"}   # its tiny/offline form: what the tests build
        exports_onnx = True                # claim: the prefix system built with it exports to ONNX

pytest collects the inherited tests (one class per component):

    test_registration_metadata      name, kind, distribution, version, description, "module:attr" factory, options
    test_registration_imports_no_torch   a fresh interpreter lists components and resolves this one without torch
    test_builds_from_its_tiny_form  prefixcap.create() builds it and it states its facts (dims, tokens, width)
    test_shapes_with_builtin_partners    in a prefix system with the builtin partners: logits (B, T, V) and the
                                    facts hold (encoder (B, N, D), connector (B, K, H), decoder width H)
    test_one_training_step          AdamW on system.param_groups() moves trainable parameters only, and some
    test_save_load_round_trip       system.save + prefixcap.load: same tensors, logits and greedy captions
    test_onnx_export                prefixcap.export.export_system + OnnxCaptioner: same greedy captions as
                                    PyTorch; skipped (with the reason) unless the class claims exports_onnx

The component under test takes its own slot of a prefix system; the other two slots are builtins in their tiny,
offline form (``partner_encoder``, ``partner_connector``, ``partner_decoder``: override them as class attributes).
Each test builds its own tiny system, so a test never sees another's training; the whole set takes 10-20 s per
component on 2 CPU cores, most of it the ONNX export. Two classes whose systems save to identical files (the same
recipe, seed and training) share one export: pairing components in a few systems exports each system once.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, ClassVar

import pytest

MARKER = "prefixcap_conformance"
KINDS = ("encoder", "connector", "decoder")  # the slots of a prefix system, which is what the kit builds
ENABLED = pytest.StashKey[bool]()
FACTORY_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
HEAVY = ("torch", "transformers")  # what a plugin module must not import (prefixcap/hookspecs.py)
ONNX_LOGITS_ATOL = 1e-4  # onnxruntime vs PyTorch on the same pixels; tests/test_export.py measured at most 4e-7


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
    only = os.environ.get("PREFIXCAP_LOAD_PLUGINS")
    lines = [f"prefixcap {prefixcap.__version__} conformance kit; third-party components from: {', '.join(third) or 'none'}"
             + (f" (PREFIXCAP_LOAD_PLUGINS={only!r})" if only is not None else "")]  # fmt: skip
    return lines + [f"prefixcap broken plugin {b.provider.dist}:{b.provider.plugin}: {b.error}" for b in reg.broken]


# --- the tests --------------------------------------------------------------------------------------------------


class ComponentConformance:
    """Subclass as ``Test...`` and set ``kind``, ``name`` and ``options``; see the module docstring."""

    kind: ClassVar[str] = ""  # "encoder", "connector" or "decoder"
    name: ClassVar[str] = ""  # its registered name
    options: ClassVar[dict[str, Any]] = {}  # recipe options of its tiny/offline form (no network, small, random ok)
    exports_onnx: ClassVar[bool] = False  # claim that a prefix system with it exports to ONNX (tested when True)
    distribution: ClassVar[str | None] = None  # if set: the distribution that must provide it

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

        # Tiny models run fastest on one thread; with more, threads spin-wait for each other whenever another job
        # holds a core, which made a 1 s test take a minute on a shared 2-core machine.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        yield
        torch.set_num_threads(threads)

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

        processor = system.encoder.image_processor
        side = math.floor(processor.size / processor.crop_pct)
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

    # -- the standard tests

    def test_registration_metadata(self):
        from pydantic import ValidationError

        from prefixcap.registry import ComponentOptions, get_component, registry

        reg = get_component(self.kind, self.name)
        assert (reg.kind, reg.name) == (self.kind, self.name)
        assert reg.provider.dist and reg.provider.version and reg.provider.plugin, f"incomplete provider {reg.provider}"
        if self.distribution is not None:
            assert reg.provider.dist == self.distribution, f"provided by {reg.provider}, not {self.distribution}"
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

        from prefixcap import create
        from prefixcap.images import ImageProcessor
        from prefixcap.interfaces import Connector, Decoder, Encoder

        def build(kind: str, spec: dict[str, Any], **wiring: Any) -> Any:
            return create(kind, spec["name"], {k: v for k, v in spec.items() if k != "name"}, **wiring)

        torch.manual_seed(self.seed)
        if self.kind == "encoder":
            part = build("encoder", self.spec(), pretrained=True)
            assert isinstance(part, Encoder)
            assert part.dim > 0 and part.num_tokens > 0
            assert isinstance(part.image_processor, ImageProcessor) and part.image_processor.size > 0
        elif self.kind == "decoder":
            part = build("decoder", self.spec(), pretrained=True)
            assert isinstance(part, Decoder) and part.hidden_size > 0
            assert part.tokenizer is not None, "the tiny form must have a tokenizer, or it cannot caption"
            prompt = part.prompt_ids()
            assert prompt.ndim == 1 and prompt.dtype == torch.long
        else:
            encoder = build("encoder", self.partner_encoder, pretrained=True)
            decoder = build("decoder", self.partner_decoder, pretrained=True)
            part = build("connector", self.spec(), in_dim=encoder.dim, out_dim=decoder.hidden_size,
                         in_tokens=encoder.num_tokens)  # fmt: skip
            assert isinstance(part, Connector)
            assert (part.in_dim, part.out_dim) == (encoder.dim, decoder.hidden_size)
            assert part.output_tokens(encoder.num_tokens) > 0

    def test_shapes_with_builtin_partners(self):
        import torch

        system = self.compose_system().eval()
        encoder, connector, decoder = system.encoder, system.connector, system.decoder
        batch = self.batch(system)
        b, t = batch.input_ids.shape
        size = encoder.image_processor.size
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
        assert np.abs(logits - reference).max() < ONNX_LOGITS_ATOL, "first-step logits differ from PyTorch's"
        assert captioner.caption(images) == loaded.caption(images)
