"""Model cards, hub ids and `prefixcap push`, offline: no hub is reachable here, so the hub's side is played by its
own library, huggingface_hub, reading a cache laid out as its downloads leave one (``lay_out_hub_cache``).

huggingface_hub reads HF_HUB_OFFLINE, HF_HUB_CACHE and HF_ENDPOINT from the environment once, when it is imported:
in this process the tests set its constants to what those variables would have set; the command line tests set the
variables themselves, in the environment of a fresh `prefixcap`."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard, constants, scan_cache_dir
from huggingface_hub.file_download import repo_folder_name
from huggingface_hub.utils import filter_repo_objects
from PIL import Image
from safetensors.torch import load_file

import prefixcap
from prefixcap.card import PLACEHOLDER, base_checkpoints, hub_id, system_card
from prefixcap.errors import SavedSystemError
from prefixcap.hub import ALLOW_PATTERNS, HubError, resolve, upload_plan
from prefixcap.persist import saved_system_dir

from conftest import run_cli, train_quietly

REPO_ID = "alice/alt-text"
# The quickstart, as small as a run gets: a real final/ and metrics.json, written by `prefixcap run`'s own code.
SHORT = ["data.train_size=32", "data.val_size=4", "data.test_size=4", "train.steps=4", "train.batch_size=8",
         "eval.batch_size=8", "connector.hidden=32", "generate.max_new_tokens=6", "eval.clip_model=null",
         "output.tensorboard=false"]  # fmt: skip


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("short-run")
    train_quietly("quickstart", SHORT, root / "run", root / "features")
    return root / "run"


@pytest.fixture
def offline_cache(tmp_path, monkeypatch) -> Path:
    """An empty hub cache of this test's own, offline (what HF_HUB_CACHE=<dir> HF_HUB_OFFLINE=1 set at import)."""
    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def lay_out_hub_cache(cache: Path, repo_id: str, folder: Path) -> Path:
    """Put ``folder`` into ``cache`` as huggingface_hub leaves a downloaded model repository: each file's bytes once
    in blobs/ (named by their git blob hash, or their sha256 for the LFS-stored safetensors), snapshots/<commit>/
    <path> a relative symlink to the blob, refs/main holding the commit. Returns the snapshot directory."""
    storage = cache / repo_folder_name(repo_id=repo_id, repo_type="model")
    commit = hashlib.sha1(f"{repo_id} {folder}".encode()).hexdigest()  # any 40 hex digits: a commit hash's form
    (storage / "blobs").mkdir(parents=True)
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = path.read_bytes()
        lfs = path.suffix == ".safetensors"
        blob = hashlib.sha256(data).hexdigest() if lfs else hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        (storage / "blobs" / blob).write_bytes(data)
        link = storage / "snapshots" / commit / path.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(storage / "blobs" / blob, link.parent))
    (storage / "refs").mkdir()
    (storage / "refs" / "main").write_text(commit)
    return storage / "snapshots" / commit


def finite_split_metrics(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k.startswith(("test_", "val_")) and isinstance(v, (int, float))
            and math.isfinite(v)}  # fmt: skip


# --- A. model cards ---------------------------------------------------------------------------------------------------


def test_a_runs_final_holds_a_model_card_with_its_metrics(run_dir):
    final = run_dir / "final"
    card = ModelCard.load(final / "README.md")  # the hub's own parser: the YAML must be what it reads
    data = card.data
    assert (data.library_name, data.pipeline_tag, data.language) == ("prefixcap", "image-to-text", "en")
    # The quickstart's encoder ships with prefixcap and its decoder is `tiny`: neither is a hub model to link to.
    assert data.base_model is None and data.datasets is None
    assert "`prefixcap/shapes-siglip`, bundled with prefixcap" in card.text and "(`tiny`)" in card.text
    metrics = json.loads((run_dir / "metrics.json").read_text())
    expected = finite_split_metrics(metrics)
    assert "test_loss" in expected and data.model_name == "run"  # the run directory's name
    assert {r.metric_name: r.metric_value for r in data.eval_results} == expected
    assert {(r.task_type, r.dataset_type, r.dataset_split) for r in data.eval_results} == {
        ("image-to-text", "shapes", "test" if k.startswith("test_") else "validation") for k in expected}
    stored = sum(t.numel() for p in final.rglob("*.safetensors") for t in load_file(p).values())
    assert f"Its safetensors files hold {stored:,} parameters" in card.text
    assert f'prefixcap.load("{PLACEHOLDER}")' in card.text and "## Limitations" in card.text


def test_card_metadata_names_hub_checkpoints_and_datasets_and_hides_local_paths(run_dir, tmp_path):
    final = run_dir / "final"
    manifest = json.loads((final / "manifest.json").read_text())
    local = tmp_path / "secret-dir" / "my-base-lm"
    local.mkdir(parents=True)
    recipe = manifest["recipe"]
    recipe["encoder"]["checkpoint"] = "google/siglip-base-patch16-224"
    recipe["decoder"]["checkpoint"] = str(local)
    recipe["data"] = {"name": "hf", "path": "jxie/flickr8k", "config": None, "revision": "abc123"}
    metrics = {"test_cider": 0.5, "test_loss": float("nan"), "val_bleu4": 0.25, "steps": 10, "best_val_loss": 1.0}
    card = ModelCard(system_card(final, manifest, metrics, name="flickr"))
    assert card.data.base_model == ["google/siglip-base-patch16-224"]  # the local decoder is no hub model
    assert card.data.datasets == ["jxie/flickr8k"]
    results = {r.metric_name: (r.metric_value, r.dataset_type, r.dataset_split, r.dataset_revision)
               for r in card.data.eval_results}  # fmt: skip
    assert results == {"test_cider": (0.5, "jxie/flickr8k", "test", "abc123"),  # NaN loss left out
                       "val_bleu4": (0.25, "jxie/flickr8k", "validation", "abc123")}
    assert "a local checkpoint (`my-base-lm`)" in card.text and "secret-dir" not in str(card)
    # A system that owns its models names them itself; ids spelled for timm/open_clip count, library tags do not.
    crossattn = {"system": {"name": "crossattn", "encoder": "google/vit-base-patch16-224-in21k",
                            "decoder": "distilbert/distilgpt2"}, "encoder": {"checkpoint": "openai"},
                 "decoder": {"checkpoint": "hf-hub:timm/vit_small_patch16_224.augreg_in21k"}}  # fmt: skip
    assert [hub_id(c) for _, c in base_checkpoints(crossattn)] == [
        "google/vit-base-patch16-224-in21k", "distilbert/distilgpt2", None, "timm/vit_small_patch16_224.augreg_in21k"]


# --- B. hub ids wherever a saved system is taken ----------------------------------------------------------------------


def test_downloads_never_fetch_a_pickle():
    """snapshot_download applies ALLOW_PATTERNS with this function: what it keeps is all a download can fetch."""
    names = ["manifest.json", "README.md", "connector/model.safetensors", "decoder/adapter_config.json",
             "decoder/adapter_model.safetensors", "decoder/tokenizer.json", "decoder/merges.txt",
             "decoder/tokenizer.model", "decoder/chat_template.jinja", "pytorch_model.bin", "decoder/model.pt",
             "x.pth", "state.pkl", "y.pickle", "z.ckpt", "a.tar", "run.py", "model.onnx"]  # fmt: skip
    assert list(filter_repo_objects(names, allow_patterns=ALLOW_PATTERNS)) == names[:9]


def test_a_hub_id_loads_from_the_hub_cache_like_the_local_folder(run_dir, offline_cache, tmp_path, monkeypatch):
    final = run_dir / "final"
    snapshot = lay_out_hub_cache(offline_cache, REPO_ID, final)
    (repo,) = scan_cache_dir(offline_cache).repos  # huggingface_hub itself reads the layout as a valid cache
    (revision,) = repo.revisions
    assert (repo.repo_id, revision.refs) == (REPO_ID, frozenset({"main"}))
    assert {f.file_name for f in revision.files} == {p.name for p in final.rglob("*") if p.is_file()}

    assert saved_system_dir(REPO_ID) == snapshot
    images = [Image.new("RGB", (64, 64), c) for c in ("red", "navy", "white")]
    local, remote = prefixcap.load(final), prefixcap.load(REPO_ID)
    assert remote.caption(images) == local.caption(images)
    for (name, a), (_, b) in zip(local.state_dict().items(), remote.state_dict().items()):
        assert torch.equal(a, b), name

    # A local directory of the same name wins over the hub.
    monkeypatch.chdir(tmp_path)
    shutil.copytree(final, tmp_path / REPO_ID)
    assert resolve(REPO_ID) == Path(REPO_ID)


def test_a_hub_id_neither_local_nor_cached_is_one_clear_error_offline(offline_cache):
    with pytest.raises(SavedSystemError) as caught:
        prefixcap.load("nobody/nothing")
    assert str(caught.value) == (f"nobody/nothing: no such directory, and the hub cache ({offline_cache}) holds no "
                                 "snapshot of the model repository nobody/nothing while HF_HUB_OFFLINE is set; "
                                 "download it once online, or give a local directory")  # fmt: skip
    with pytest.raises(SavedSystemError, match=r"not/a/hub/id: no such directory; expected a run directory or a saved system"):
        prefixcap.load("not/a/hub/id")  # two slashes: only ever a path, never looked up on the hub


def test_cli_caption_and_export_take_a_hub_id(run_dir, tmp_path):
    from prefixcap.caption import caption_paths, load_captioner

    cache = tmp_path / "hub-cache"
    lay_out_hub_cache(cache, REPO_ID, run_dir / "final")
    paths = []
    for i, colour in enumerate(("red", "navy", "white")):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.new("RGB", (64, 64), colour).save(paths[-1])
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    result = run_cli("caption", REPO_ID, *paths, env=env, cwd=tmp_path)
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    # The CLI's defaults, on the local folder. Four steps of training may leave a caption empty: an error row, the
    # same from either copy, and exit code 1.
    local = [(str(r.path), r.caption, r.error) for r in caption_paths(load_captioner(run_dir), paths)]
    assert [(row["path"], row["caption"], row["error"]) for row in rows] == local, result.stderr
    assert result.returncode == (1 if any(error for _, _, error in local) else 0), result.stderr

    # An id that the cache lacks, with the hub unreachable: one line, prefixcap's words, exit code 2.
    unreachable = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9",
                   "HF_HOME": str(tmp_path / "hf-home"), "HF_TOKEN": "hf_not_a_real_token"}  # fmt: skip
    missing = run_cli("export", "nobody/nothing", "--out", str(tmp_path / "onnx"), env=unreachable, cwd=tmp_path)
    assert missing.returncode == 2 and missing.stdout == ""
    assert missing.stderr.startswith("error: nobody/nothing: no such directory, and the model hub "
                                     "(http://127.0.0.1:9) cannot be reached (")  # fmt: skip
    assert missing.stderr.count("\n") == 1 and "Traceback" not in missing.stderr
    assert "couldn't connect" not in missing.stderr and not (tmp_path / "onnx").exists()


def test_an_export_carries_the_card_with_its_runs_metrics(run_dir, tmp_path):
    from prefixcap.export import export_system

    manifest = export_system(run_dir, tmp_path / "onnx")  # a hub id gets here through saved_system_dir (above)
    card = ModelCard.load(tmp_path / "onnx" / "README.md")
    assert "README.md" in manifest["files"] and "onnx" in card.data.tags and card.data.library_name == "prefixcap"
    assert "prefixcap caption --onnx model photo.jpg" in card.text and "`decoder.onnx`" in card.text
    metrics = finite_split_metrics(json.loads((run_dir / "metrics.json").read_text()))
    assert {r.metric_name: r.metric_value for r in card.data.eval_results} == metrics


# --- C. prefixcap push ------------------------------------------------------------------------------------------------


def test_push_plan_is_exactly_the_saved_system_and_its_card(run_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("checkpoints", "tensorboard"))
    final = run / "final"
    (final / ".README.md.swp").write_text("an editor's")  # dot files stay home
    manifest = json.loads((final / "manifest.json").read_text())
    listed = [f"{slot}/{name}" for slot, names in manifest["files"].items() for name in names]
    plan = upload_plan(run, REPO_ID, license="apache-2.0")
    assert plan.folder == final and plan.card_origin == "folder"
    everything = sorted(p.relative_to(final).as_posix() for p in final.rglob("*") if p.is_file())
    assert plan.files == [name for name in everything if name != ".README.md.swp"]
    assert {"README.md", "manifest.json", *listed} <= set(plan.files)  # (and config.json, for transformers)
    card = ModelCard(plan.card)
    assert card.data.license == "apache-2.0" and f'prefixcap.load("{REPO_ID}")' in card.text
    assert PLACEHOLDER not in plan.card

    # A system saved before cards existed gets the card its final/ would have had, written from its manifest and
    # its run's metrics.json.
    saved = (final / "README.md").read_text()
    (final / "README.md").unlink()
    plan = upload_plan(final, REPO_ID)
    assert plan.card_origin == "written" and "README.md" in plan.files
    assert plan.card == saved.replace(PLACEHOLDER, REPO_ID)

    (final / "decoder" / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(HubError, match=r"decoder/pytorch_model.bin is a pickle-based file"):
        upload_plan(final, REPO_ID)
    with pytest.raises(HubError, match="not a model hub repository id"):
        upload_plan(final, "alice/alt/text")
    with pytest.raises(HubError, match="no such directory"):
        upload_plan(tmp_path / "elsewhere", REPO_ID)


def test_cli_push_dry_run_lists_the_files_and_failing_pushes_exit_2(run_dir, tmp_path):
    plan = upload_plan(run_dir, REPO_ID)
    dry = run_cli("push", str(run_dir), REPO_ID, "--dry-run")  # HF_HUB_OFFLINE=1: it must not need the hub
    assert dry.returncode == 0, dry.stderr
    rows = [[c.strip() for c in line.strip("│").split("│")] for line in dry.stdout.splitlines() if "│" in line]
    assert [row[0] for row in rows] == plan.files  # (the header row is drawn with ┃)
    assert "\nREADME.md: the folder's model card\n" in dry.stdout
    assert dry.stdout.endswith("dry run: nothing uploaded\n")

    offline = run_cli("push", str(run_dir), REPO_ID)
    assert offline.returncode == 2
    assert offline.stderr == (f"error: cannot push to {REPO_ID}: HF_HUB_OFFLINE is set, so the hub is not contacted; "
                              "unset it to push (nothing was uploaded)\n")  # fmt: skip
    unreachable = run_cli("push", str(run_dir), REPO_ID, "--private", env={
        "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf-home"),
        "HF_TOKEN": "hf_not_a_real_token"})  # fmt: skip
    assert unreachable.returncode == 2 and unreachable.stderr.count("\n") == 1, unreachable.stderr
    assert unreachable.stderr.startswith(f"error: cannot push to {REPO_ID}: the hub at http://127.0.0.1:9 cannot be "
                                         "reached (")  # fmt: skip
    assert "nothing was committed" in unreachable.stderr and "Traceback" not in unreachable.stderr
