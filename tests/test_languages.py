"""Language adapters (prefixcap.languages): added beside a trained system, switched per call, saved in peft's format,
trained alone by a `base:` recipe, and English untouched bit for bit throughout."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import prefixcap
from prefixcap import compose
from prefixcap.config import LanguageConfig
from prefixcap.data import ShapesOptions
from prefixcap.data.shapes import ShapesSource, scene_accuracy
from prefixcap.errors import CompositionError, RecipeError, SavedSystemError
from prefixcap.recipe import load_recipe

from conftest import CAPTIONS, IMAGES, TINY, fit_batch, run_cli, train_quietly, learning_cache

FULL = {**TINY, "decoder": {**TINY["decoder"], "finetune": "full"}}  # the quickstart's kind: no LoRA of its own


def trained(recipe) -> prefixcap.System:
    torch.manual_seed(0)
    system = compose(recipe)
    fit_batch(system, IMAGES, CAPTIONS, 3)
    return system


def with_languages(system, *names: str) -> None:
    """Add adapters and give them random weights, as training would make them differ from zero (LoRA starts at 0)."""
    generator = torch.Generator().manual_seed(1)
    for name in names:
        system.decoder.add_language(LanguageConfig(name=name), token_ids=[5, 6, 7])
        with torch.no_grad():
            for p in system.decoder.language_parameters(name):
                p.add_(torch.randn(p.shape, generator=generator) * 0.5)


def plain(name: str) -> str:
    """A tensor's name with peft's wrapping (which a language adds around a base layer) taken out."""
    return name.replace(".base_layer", "").replace(".token_adapter", "")


def first_logits(system) -> torch.Tensor:
    with torch.no_grad():
        inputs = system.generation_inputs(system.encoder.preprocess(IMAGES))
        return system.decoder(inputs, torch.ones(inputs.shape[:2], dtype=torch.long))


@pytest.mark.parametrize("recipe", [FULL, TINY], ids=["full-base", "lora-base"])
def test_english_is_unchanged_bit_for_bit_and_languages_switch_per_call(recipe):
    system = trained(recipe)
    logits, english = first_logits(system), system.caption(IMAGES, max_new_tokens=8)
    base = {k: v.clone() for k, v in system.state_dict().items()}
    with_languages(system, "de", "fr")
    assert system.languages == ["de", "fr"] and system.decoder.language is None
    assert torch.equal(first_logits(system), logits)
    german = system.caption(IMAGES, max_new_tokens=8, lang="de")
    french = system.caption(IMAGES, max_new_tokens=8, lang="fr")
    assert german != english and french != german
    assert system.caption(IMAGES, max_new_tokens=8) == english and system.decoder.language is None
    assert system.caption(IMAGES, max_new_tokens=8, lang="en") == english
    assert system.caption(IMAGES, max_new_tokens=8, lang="de") == german  # switched back: nothing reloaded
    names = {n for n, _ in system.decoder.named_parameters()}
    adapters = {n for name in ("de", "fr") for n, p in system.decoder.named_parameters()
                if any(p is q for q in system.decoder.language_parameters(name))}  # fmt: skip
    assert adapters and adapters < names
    # the base's tensors are the ones it had (under peft's wrapping names)
    after = system.state_dict()
    for name, tensor in base.items():
        wrapped = [k for k in after if plain(k) == plain(name)]
        assert len(wrapped) == 1 and torch.equal(after[wrapped[0]], tensor), name


def test_unknown_language_is_refused_with_those_there_are():
    system = trained(FULL)
    with_languages(system, "de")
    with pytest.raises(CompositionError, match=r"no 'ru' language adapter.*it has: de"):
        system.caption(IMAGES, lang="ru")
    with pytest.raises(CompositionError, match="has a 'de' language adapter already"):
        system.decoder.add_language(LanguageConfig(name="de"))
    assert system.decoder.language is None


@pytest.mark.parametrize("recipe", [FULL, TINY], ids=["full-base", "lora-base"])
def test_save_and_load_round_trip_in_peft_format(recipe, tmp_path):
    system = trained(recipe)
    english = system.caption(IMAGES, max_new_tokens=8)
    with_languages(system, "de", "ru")
    german, russian = (system.caption(IMAGES, max_new_tokens=8, lang=lang) for lang in ("de", "ru"))
    system.language_info = {"de": {"metrics": {"test_oracle_accuracy": 0.5}}}
    out = system.save(tmp_path / "saved")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["languages"]["de"] == {"metrics": {"test_oracle_accuracy": 0.5},
                                           "files": ["adapter_config.json", "adapter_model.safetensors"]}
    assert set(manifest["languages"]) == {"de", "ru"}
    config = json.loads((out / "adapters" / "de" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["trainable_token_indices"] == {"embed_tokens": [5, 6, 7]}
    decoder_files = {p.name for p in (out / "decoder").iterdir()}
    from safetensors.torch import load_file

    for name in decoder_files & {"adapter_model.safetensors", "model.safetensors"}:  # the base's own, no language's
        assert not any(".de." in k or ".ru." in k or "trainable_tokens" in k for k in load_file(out / "decoder" / name))
    torch.manual_seed(123)
    loaded = prefixcap.load(out)
    assert loaded.languages == ["de", "ru"]
    assert loaded.caption(IMAGES, max_new_tokens=8) == english
    assert loaded.caption(IMAGES, max_new_tokens=8, lang="de") == german
    assert loaded.caption(IMAGES, max_new_tokens=8, lang="ru") == russian
    assert loaded.language_info["de"] == {"metrics": {"test_oracle_accuracy": 0.5}}


def test_a_hostile_manifest_or_adapter_is_refused(tmp_path):
    system = trained(FULL)
    with_languages(system, "de")
    good = system.save(tmp_path / "good")

    def broken(name, change):
        target = tmp_path / name
        shutil.copytree(good, target)
        change(target)
        return target

    def rename(target):
        manifest = json.loads((target / "manifest.json").read_text())
        manifest["languages"] = {"../../etc": manifest["languages"]["de"]}
        (target / "manifest.json").write_text(json.dumps(manifest))

    def targets(target):
        config = target / "adapters" / "de" / "adapter_config.json"
        config.write_text(json.dumps({**json.loads(config.read_text()), "target_modules": ["evil"]}))

    def weights(target):
        (target / "adapters" / "de" / "adapter_model.safetensors").unlink()

    def pickle_file(target):
        manifest = json.loads((target / "manifest.json").read_text())
        manifest["languages"]["de"]["files"] = ["adapter_model.bin"]
        (target / "manifest.json").write_text(json.dumps(manifest))

    for name, change, message in (("rename", rename, "no language tag"), ("targets", targets, "not layers of this"),
                                  ("weights", weights, "missing"), ("pickle", pickle_file, "safetensors files only")):
        with pytest.raises(SavedSystemError, match=message):
            prefixcap.load(broken(name, change))


@pytest.mark.parametrize("recipe", [FULL, TINY], ids=["full-base", "lora-base"])
def test_onnx_export_holds_a_step_graph_per_language_equal_to_pytorch(recipe, tmp_path):
    from prefixcap.export import export_system
    from prefixcap.onnx_captioner import OnnxCaptioner
    from prefixcap.onnx_spec import ExportError

    system = trained(recipe)
    with_languages(system, "de", "pt-br")
    system.save(tmp_path / "saved")
    manifest = export_system(tmp_path / "saved", tmp_path / "onnx")
    assert manifest["languages"] == {"de": "decoder_de", "pt-br": "decoder_pt_br"}
    loaded = prefixcap.load(tmp_path / "saved")
    captions = {}
    for lang in (None, "de", "pt-br"):
        captioner = OnnxCaptioner(tmp_path / "onnx", threads=1, lang=lang)
        captions[lang] = captioner.caption(IMAGES, max_new_tokens=8)
        assert captions[lang] == loaded.caption(IMAGES, max_new_tokens=8, lang=lang), lang
        assert set(captioner.sessions) == {"vision_encoder", "connector", captioner.runtime.step}  # no other language
    assert len(set(map(tuple, captions.values()))) == 3
    with pytest.raises(ExportError, match=r"no 'ru' language in this export \(it has: de, pt-br"):
        OnnxCaptioner(tmp_path / "onnx", lang="ru")
    manifest_path = tmp_path / "onnx" / "manifest.json"
    for bad, message in (({"de": "vision_encoder", "pt-br": "decoder_pt_br"}, "invalid manifest: runtime"),
                         ({"../x": "decoder_de", "pt-br": "decoder_pt_br"}, "invalid manifest: languages"),
                         ({"de": "decoder_de", "pt-br": "decoder_nope"}, "decoder_pt_br' is neither")):
        written = json.loads(manifest_path.read_text())
        manifest_path.write_text(json.dumps({**written, "languages": bad}))
        with pytest.raises(ExportError, match=message):
            OnnxCaptioner(tmp_path / "onnx")
        manifest_path.write_text(json.dumps(written))


def test_recipe_with_base_takes_no_parts_and_needs_a_language():
    language = {"base": "runs/quickstart", "language": {"name": "de"}, "data": {"name": "shapes", "language": "de"}}
    recipe = load_recipe(language)
    assert recipe.base == "runs/quickstart" and recipe.language == LanguageConfig(name="de")
    for change, message in (({"language": None}, "go together"), ({"encoder": "siglip"}, "takes its encoder"),
                            ({"language": {"name": "en"}}, "base system's own language"),
                            ({"language": {"name": "../x"}}, "should match pattern")):
        with pytest.raises(RecipeError, match=message):
            load_recipe({**language, **change})


# --- training one on the trained quickstart -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def german_run(quickstart_short, tmp_path_factory):
    base = prefixcap.load(quickstart_short.run_dir)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    out = tmp_path_factory.mktemp("german")
    overrides = [f"base={quickstart_short.run_dir}", "data.train_size=2000", "data.val_size=50", "data.test_size=200",
                 "train.steps=400", "eval.every_steps=400", "eval.clip_model=null", "output.tensorboard=false"]
    result = train_quietly("quickstart-de", overrides, out / "run", learning_cache(tmp_path_factory))
    return quickstart_short, state, result


def test_a_language_run_trains_its_adapter_alone_and_keeps_english(german_run):
    english_run, base_state, result = german_run
    manifest = json.loads((result.run_dir / "final" / "manifest.json").read_text())
    entry = manifest["languages"]["de"]
    assert entry["steps"] == 400 and entry["share_of_system"] < 0.02 and entry["parameters"] > 0
    assert entry["base"] == str(english_run.run_dir / "final")
    assert entry["metrics"]["test_oracle_accuracy"] == result.metrics["test_oracle_accuracy"]
    # German captions, by the German parser: 400 steps state most held-out scenes (the recipe's 1,000: README)
    assert result.metrics["test_oracle_accuracy"] >= 0.5, result.metrics
    german = prefixcap.load(result.run_dir)
    base = prefixcap.load(english_run.run_dir)
    after = german.state_dict()
    for name, tensor in base_state.items():  # every tensor of the base as it was, in the new system too
        wrapped = [k for k in after if plain(k) == plain(name)]
        assert len(wrapped) == 1 and torch.equal(after[wrapped[0]], tensor), name
    source = ShapesSource(ShapesOptions(train_size=2000, val_size=50, test_size=200))
    examples = [source.example("test", i) for i in range(40)]
    images = [e.image for e in examples]
    assert german.caption(images) == base.caption(images)  # English, bit for bit
    captions = german.caption(images, lang="de")
    assert scene_accuracy(captions, [e.scene for e in examples], "de") >= 0.5
    assert scene_accuracy(captions, [e.scene for e in examples], "en") == 0  # German, not English


def test_caption_command_takes_lang(german_run, tmp_path):
    _, _, result = german_run
    source = ShapesSource(ShapesOptions(train_size=2000, val_size=50, test_size=200))
    path = tmp_path / "scene.png"
    source.example("test", 0).image.save(path)
    rows = {}
    for lang in ("en", "de"):
        done = run_cli("caption", str(result.run_dir), str(path), "--lang", lang, "--raw")
        assert done.returncode == 0, done.stderr
        rows[lang] = json.loads(done.stdout)["caption"]
    system = prefixcap.load(result.run_dir)
    image = source.example("test", 0).image
    assert rows["en"] == system.caption([image])[0] and rows["de"] == system.caption([image], lang="de")[0]
    assert rows["de"] != rows["en"]
    wrong = run_cli("caption", str(result.run_dir), str(path), "--lang", "fr")
    assert wrong.returncode == 2 and "no 'fr' language adapter" in wrong.stderr and "it has: de" in wrong.stderr
    scored = run_cli("caption", str(result.run_dir), str(path), "--lang", "de", "--score")
    assert scored.returncode == 2 and "read English only" in scored.stderr


def test_seeding_starts_glossed_words_from_their_english_rows_in_the_adapter_only():
    system = trained(FULL)
    tokenizer, decoder = system.decoder.tokenizer, system.decoder
    ids = {w: tokenizer(w, add_special_tokens=False).input_ids for w in (" roter", " red", " Kreis", " circle", " ein")}
    assert all(len(v) == 1 for v in ids.values()), ids  # the tiny tokenizer has each as one token
    roter, red, kreis, circle, ein = (v[0] for v in ids.values())
    before = decoder.embed(torch.tensor([[roter, kreis, ein, red]])).clone()
    decoder.add_language(LanguageConfig(name="de"), token_ids=[roter, kreis, ein])
    assert decoder.seed_language("de", {"roter": "red", "Kreis": "circle", "Haus": "house"}) == 2
    with system.speaking("de"):
        german = decoder.embed(torch.tensor([[roter, kreis, ein, red]]))
    assert torch.equal(german[0, 0], before[0, 3]) and torch.equal(german[0, 3], before[0, 3])  # roter = red
    assert torch.equal(german[0, 1], decoder.embed(torch.tensor([[circle]]))[0, 0])  # Kreis = circle
    assert torch.equal(german[0, 2], before[0, 2])  # no gloss: its base row
    assert torch.equal(decoder.embed(torch.tensor([[roter, kreis, ein, red]])), before)  # English: the base rows
