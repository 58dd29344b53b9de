from __future__ import annotations

import textwrap
import tracemalloc

import pytest

from prefixcap import CompositionError, RecipeError, compose, load_recipe
from prefixcap.connectors import MLPOptions
from prefixcap.decoders import SmolLMOptions
from prefixcap.encoders import SiglipOptions
from prefixcap.recipe import apply_override

GOOD = """\
description: a test recipe
system: prefix
encoder:
  name: siglip
  checkpoint: tiny
connector:
  name: mlp
  hidden: 64
decoder:
  name: smollm
  checkpoint: tiny
  lora: {r: 4, targets: [q_proj, v_proj]}
train:
  lr: 3.0e-4
  batch_size: 8
losses:
  - name: caption-ce
"""


def write(tmp_path, text: str, name: str = "r.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def error_of(source, overrides=()) -> str:
    with pytest.raises(RecipeError) as e:
        load_recipe(source, overrides)
    return str(e.value)


def test_good_recipe_gives_typed_component_options(tmp_path):
    recipe = load_recipe(write(tmp_path, GOOD))
    assert isinstance(recipe.encoder.options, SiglipOptions) and recipe.encoder.options.checkpoint == "tiny"
    assert isinstance(recipe.connector.options, MLPOptions) and recipe.connector.options.hidden == 64
    assert recipe.connector.options.activation == "gelu"  # the component's own default
    assert isinstance(recipe.decoder.options, SmolLMOptions)
    assert recipe.decoder.options.lora.r == 4 and recipe.decoder.options.lora.targets == ["q_proj", "v_proj"]
    assert [loss.name for loss in recipe.losses] == ["caption-ce"]  # default loss
    assert recipe.train.lr == 3e-4 and recipe.train.batch_size == 8
    assert recipe.generate.do_sample is False and recipe.generate.num_beams == 1  # greedy unless asked


def test_bundled_recipes_load_by_name():
    assert load_recipe("quickstart").decoder.options.checkpoint == "tiny"
    assert load_recipe("siglip-smollm135").decoder.options.checkpoint == "HuggingFaceTB/SmolLM-135M"


def test_unknown_component_name_gives_line_and_suggestion(tmp_path):
    msg = error_of(write(tmp_path, GOOD.replace("name: mlp", "name: mpl")))
    assert msg.startswith(f"{tmp_path / 'r.yaml'}:7: connector.name: unknown connector 'mpl'; did you mean 'mlp'?")


def test_wrong_type_gives_yaml_path_line_value_and_expectation(tmp_path):
    msg = error_of(write(tmp_path, GOOD.replace("batch_size: 8", "batch_size: eight")))
    assert msg == (f"{tmp_path / 'r.yaml'}:15: train.batch_size: Input should be a valid integer, unable to parse "
                   "string as an integer; got 'eight'")  # fmt: skip


def test_component_option_errors_point_into_the_component(tmp_path):
    msg = error_of(write(tmp_path, GOOD.replace("r: 4", "r: 0").replace("hidden: 64", "hiden: 64")))
    lines = msg.splitlines()
    assert lines[0].endswith(":8: connector.hiden: unknown option 'hiden' (expected one of: activation, "
                             "dropout, factor, hidden, lr, pool)")  # fmt: skip
    assert lines[1].endswith(":12: decoder.lora.r: Input should be greater than or equal to 1; got 0")


def test_all_problems_are_reported_together_in_file_order(tmp_path):
    text = GOOD.replace("name: siglip", "name: sigclip").replace("lr: 3.0e-4", "lr: -1").replace("r: 4", "r: x")
    lines = error_of(write(tmp_path, text)).splitlines()
    assert [line.split(":")[1] for line in lines] == ["4", "12", "14"]


def test_missing_required_option(tmp_path):
    msg = error_of({"decoder": {"name": "causal-lm"}})
    assert msg == "decoder.checkpoint: required but missing"  # a dict has no file to name (it said `<dict>: `)


def test_unknown_section(tmp_path):
    msg = error_of(write(tmp_path, GOOD + "trian:\n  lr: 1\n"))
    assert msg.startswith(f"{tmp_path / 'r.yaml'}:18: trian: unknown section 'trian' (expected one of:")


def test_not_a_mapping_and_bad_yaml(tmp_path):
    assert "a recipe is a mapping of sections" in error_of(write(tmp_path, "- a\n- b\n"))
    assert error_of(write(tmp_path, "train:\n  lr: [1,\n")).startswith(f"{tmp_path / 'r.yaml'}:3: invalid YAML")
    assert "no such recipe file or name" in error_of(tmp_path / "missing.yaml")


def test_yaml_alias_bomb_is_refused_before_it_expands(tmp_path):
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(8)
    )
    path = write(tmp_path, bomb)
    load_recipe(write(tmp_path, GOOD, "good.yaml"))  # imports done first: only the bomb is measured
    tracemalloc.start()
    try:
        message = error_of(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # the node counter's refusal, after 100,000 of the 9**9 (387 million) nodes the aliases expand to
    assert message == f"{path}: recipe is too large or expands without bound (over 100000 YAML nodes)"
    assert peak < 100 * 2**20, peak  # the expanded lists alone would take 3 GB


def test_overrides_set_values_with_yaml_types(tmp_path):
    path = write(tmp_path, GOOD)
    recipe = load_recipe(path, ["train.lr=1e-2", "connector.hidden=32", "decoder.lora.targets=[o_proj]",
                                "losses.0.weight=0.5", "generate.max_new_tokens=12"])  # fmt: skip
    assert recipe.train.lr == 0.01
    assert recipe.connector.options.hidden == 32
    assert recipe.decoder.options.lora.targets == ["o_proj"]
    assert recipe.losses[0].options.weight == 0.5
    assert recipe.generate.max_new_tokens == 12


def test_override_expands_name_shorthand_and_creates_sections():
    recipe = load_recipe({"encoder": "siglip"}, ["encoder.checkpoint=tiny", "connector.name=linear"])
    assert recipe.encoder.options.checkpoint == "tiny" and recipe.connector.name == "linear"


def test_override_errors_name_the_override(tmp_path):
    msg = error_of(write(tmp_path, GOOD), ["train.batch_size=0"])
    assert msg == "--set train.batch_size: train.batch_size: Input should be greater than or equal to 1; got 0"
    assert error_of(write(tmp_path, GOOD), ["nosuch.key=1"]).startswith("--set nosuch.key: nosuch: unknown section")
    for bad in ("train.lr", "=3", "train..lr=1"):
        assert "expected KEY=VALUE" in error_of(write(tmp_path, GOOD), [bad])
    assert "is not a section" in error_of(write(tmp_path, GOOD), ["train.lr.x=1"])


def test_dict_source_is_not_mutated():
    source = {"encoder": {"name": "siglip", "checkpoint": "tiny"}}
    load_recipe(source, ["encoder.checkpoint=other"])
    assert source == {"encoder": {"name": "siglip", "checkpoint": "tiny"}}


def test_apply_override_list_index():
    data = {"losses": [{"name": "caption-ce"}]}
    apply_override(data, "losses.0.label_smoothing=0.1")
    assert data == {"losses": [{"name": "caption-ce", "label_smoothing": 0.1}]}


def test_checkpoint_is_an_option_only_of_components_that_load_weights(tmp_path):
    path = write(tmp_path, GOOD.replace("  hidden: 64\n", "  hidden: 64\n  checkpoint: x\n"))
    assert error_of(path) == (f"{path}:9: connector.checkpoint: unknown option 'checkpoint' (expected one of: "
                              "activation, dropout, factor, hidden, lr, pool)")  # fmt: skip
    for slot, section in (("losses.0", {"losses": [{"name": "caption-ce", "checkpoint": "x"}]}),
                          ("system", {"system": {"name": "prefix", "checkpoint": "x"}}),
                          ("data", {"data": {"name": "shapes", "checkpoint": "x"}})):  # fmt: skip
        assert error_of(section).startswith(f"{slot}.checkpoint: unknown option 'checkpoint'")
    recipe = load_recipe({"encoder": {"name": "siglip", "checkpoint": "tiny"},
                          "losses": [{"name": "clip-align", "checkpoint": "tiny"}]})  # fmt: skip
    assert recipe.encoder.options.checkpoint == "tiny" and recipe.losses[0].options.checkpoint == "tiny"


# --- a recipe keeps its source (file name, lines, overrides) through load_recipe, compose and bench ---------------

QUICKSTART_FACTOR = ["connector.pool=avg", "connector.factor=16"]  # valid options that no 8x8 token grid divides


def test_a_loaded_recipe_is_returned_as_is_and_overrides_keep_its_lines():
    recipe = load_recipe("quickstart")
    assert load_recipe(recipe) is recipe
    assert error_of(recipe, ["train.lr=oops"]).startswith("--set train.lr: train.lr: Input should be a valid number")
    again = load_recipe(load_recipe("quickstart", ["train.lr=1e-2"]), ["train.steps=5"])
    assert (again.source, again.train.lr, again.train.steps) == ("quickstart", 0.01, 5)
    assert [again.location(("train", key)) for key in ("lr", "steps")] == ["--set train.lr", "--set train.steps"]
    assert again.location(("encoder", "checkpoint")) == "quickstart:5"


def test_a_mapping_derived_from_a_recipe_keeps_the_lines_of_the_sections_it_kept():
    recipe = load_recipe("quickstart", ["generate.max_new_tokens=8"])
    spec = recipe.to_dict()
    spec["train"] = {**spec["train"], "steps": 10}
    derived = load_recipe(spec, origin=recipe)
    assert derived.source == "quickstart" and derived.train.steps == 10
    assert derived.location(("decoder", "finetune")) == "quickstart:16"  # kept as in the file
    assert derived.location(("generate", "max_new_tokens")) == "--set generate.max_new_tokens"
    assert derived.location(("train", "lr")) == "quickstart"  # a section the caller rewrote: no line, never a wrong one
    spec["decoder"]["lora"] = {"r": 0}
    assert error_of(spec) == "decoder.lora.r: Input should be greater than or equal to 1; got 0"
    with pytest.raises(RecipeError, match=r"^quickstart: decoder.lora.r: Input should be greater"):
        load_recipe(spec, origin=recipe)
    spec = recipe.to_dict()
    spec["connector"] = {**spec["connector"], "pool": "avg", "factor": 16}
    with pytest.raises(CompositionError, match=r"^quickstart: connector 'mlp': pool=avg factor=16"):
        compose(load_recipe(spec, origin=recipe), weights="none")


def test_an_override_replacing_a_section_is_named_for_everything_under_it():
    message = error_of("quickstart", ["connector={name: mlp, factor: x}"])
    assert message.startswith("--set connector: connector.factor: Input should be a valid integer")  # not line 9


def test_compose_errors_name_the_file_line_or_the_override_not_a_dict():
    """`prefixcap run quickstart --set connector.pool=avg --set connector.factor=16` said `<dict>: ...`: the run
    composes the recipe it loaded, and compose reloaded it through to_dict."""
    with pytest.raises(CompositionError) as e:
        compose(load_recipe("quickstart", QUICKSTART_FACTOR), weights="none")
    assert str(e.value).startswith("quickstart:6: connector 'mlp': pool=avg factor=16 needs a square token grid")
    recipe = load_recipe("quickstart", ["decoder.lora.targets=[q_prj]", "decoder.finetune=lora"])
    with pytest.raises(CompositionError, match=r"^quickstart:12: decoder 'smollm': LoRA targets \['q_prj'\]"):
        compose(recipe, connector={"name": "linear"}, weights="none")  # a keyword component keeps the rest's source
    with pytest.raises(CompositionError, match=r"^quickstart: connector 'mlp': pool=avg factor=3"):
        compose("quickstart", connector={"name": "mlp", "pool": "avg", "factor": 3}, weights="none")
