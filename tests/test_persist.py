from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig

import prefixcap
from prefixcap import compose
from prefixcap.decoders.tokenizer import EOS_ID, PAD_ID, tiny_tokenizer, tiny_vocab_size
from prefixcap.errors import SavedSystemError
from prefixcap.persist import saved_system_dir

from conftest import CAPTIONS, IMAGES, TINY, fit_batch



def train_steps(system, steps: int = 3) -> None:
    fit_batch(system, IMAGES, CAPTIONS, steps)


def test_save_writes_only_what_was_trained_plus_a_readable_manifest(tmp_path):
    torch.manual_seed(0)
    system = compose(TINY)
    train_steps(system)
    out = system.save(tmp_path / "final")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "prefixcap-system/1" and manifest["system"] == "prefix"
    assert manifest["components"]["decoder"] == {
        "kind": "decoder", "name": "smollm", "distribution": "prefixcap", "version": prefixcap.__version__,
        "checkpoint": "tiny", "revision": None,
    }  # fmt: skip
    assert manifest["recipe"]["connector"]["hidden"] == 32 and manifest["recipe"]["connector"]["activation"] == "gelu"
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(manifest["files"]["decoder"])
    connector = load_file(out / "connector" / "model.safetensors")
    assert set(connector) == {n for n, _ in system.connector.named_parameters()}
    assert not list(tmp_path.glob(".final.*"))  # no temporary directories left behind


def test_load_gives_identical_greedy_captions(tmp_path):
    torch.manual_seed(0)
    system = compose(TINY)
    train_steps(system)
    before = system.caption(IMAGES, max_new_tokens=12)
    system.save(tmp_path / "final")
    torch.manual_seed(123)  # a different random init underneath: everything must come from the files
    loaded = prefixcap.load(tmp_path / "final")
    assert loaded.caption(IMAGES, max_new_tokens=12) == before
    assert type(system).load(tmp_path / "final").caption(IMAGES, max_new_tokens=12) == before
    from prefixcap.systems.crossattn import CrossAttnSystem

    with pytest.raises(SavedSystemError, match="holds a PrefixSystem, not a CrossAttnSystem"):
        CrossAttnSystem.load(tmp_path / "final")
    for (name, a), (_, b) in zip(system.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")  # peft's own call on transformers 5
def test_adapter_loads_with_plain_peft(tmp_path):
    from peft import PeftModel

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         vocab_size=tiny_vocab_size(), eos_token_id=EOS_ID, pad_token_id=PAD_ID)  # fmt: skip
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "base")
    tiny_tokenizer().save_pretrained(tmp_path / "base")
    system = compose(TINY, decoder={"name": "causal-lm", "checkpoint": str(tmp_path / "base"), "lora": {"r": 4}})
    train_steps(system)
    system.save(tmp_path / "final")
    assert not (tmp_path / "final" / "decoder" / "model.safetensors").exists()  # base came from a checkpoint
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"),
                                      tmp_path / "final" / "decoder")  # fmt: skip
    ours = dict(system.decoder.model.named_parameters())
    theirs = dict(plain.named_parameters())
    lora = [n for n in ours if "lora_" in n]
    assert lora and all(torch.equal(ours[n], theirs[n]) for n in lora)
    assert prefixcap.load(tmp_path / "final").caption(IMAGES[:1], max_new_tokens=6) == system.caption(
        IMAGES[:1], max_new_tokens=6
    )


def test_bad_checkpoints_are_clear_errors(tmp_path):
    with pytest.raises(SavedSystemError, match="no manifest.json"):
        prefixcap.load(tmp_path)
    torch.manual_seed(0)
    compose(TINY).save(tmp_path / "final")
    (tmp_path / "final" / "connector" / "model.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(SavedSystemError, match="unreadable safetensors file"):
        prefixcap.load(tmp_path / "final")
    (tmp_path / "final" / "connector" / "model.safetensors").unlink()
    with pytest.raises(SavedSystemError, match="connector/model.safetensors listed in the manifest is missing"):
        prefixcap.load(tmp_path / "final")
    (tmp_path / "final" / "manifest.json").write_text("{not json")
    with pytest.raises(SavedSystemError, match="unreadable manifest"):
        prefixcap.load(tmp_path / "final")


def test_saved_system_dir_takes_a_run_or_a_saved_system(tmp_path):
    (tmp_path / "run" / "final").mkdir(parents=True)
    assert saved_system_dir(tmp_path / "run") == tmp_path / "run" / "final"
    (tmp_path / "saved").mkdir()
    (tmp_path / "saved" / "manifest.json").write_text("{}")
    assert saved_system_dir(tmp_path / "saved") == tmp_path / "saved"
    with pytest.raises(SavedSystemError, match="no such directory; expected a run directory or a saved system"):
        saved_system_dir(tmp_path / "nothing")
    (tmp_path / "unfinished" / "checkpoints").mkdir(parents=True)
    with pytest.raises(SavedSystemError, match="this run has no final/ yet"):
        saved_system_dir(tmp_path / "unfinished")


def test_tokenize_appends_eos_masks_prompt_and_padding():
    system = compose(TINY, decoder={**TINY["decoder"], "prompt": "Alt:", "add_bos": True})
    tok = system.decoder.tokenizer
    words = lambda text: tok(text, add_special_tokens=False).input_ids  # noqa: E731
    assert len(words("xq")) == 2 and len(words("xqzjkw")) == 6  # letters the tokenizer has no merges for
    ids, mask, labels = system.decoder.tokenize(["xq", "xqzjkw"], max_tokens=4)
    prompt = [tok.bos_token_id] + words("Alt:")
    p = len(prompt)
    assert ids[0, :p].tolist() == prompt and ids[1, :p].tolist() == prompt
    assert labels[0].tolist() == [-100] * p + words("xq") + [tok.eos_token_id] + [-100] * 1
    assert labels[1].tolist() == [-100] * p + words("xqz") + [tok.eos_token_id]  # truncated, EOS kept
    assert mask.sum(1).tolist() == [p + 3, p + 4]
