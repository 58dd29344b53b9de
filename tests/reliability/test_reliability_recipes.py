"""Recipes from anyone: whatever YAML text, dict or --set override comes in, the answer is a clear error and exit
code 2, never a traceback, a hang or a flood of output.

Property-based (hypothesis, derandomized): each case starts from a valid recipe (the bundled quickstart) and breaks
it in one way — a wrong type, an unknown key, a missing section or option, a number out of range, unicode and
control characters in keys, an alias bomb, a self-referencing alias, a non-mapping document, several documents,
tabs, invalid UTF-8 bytes, deep nesting, a bad tag — then runs `prefixcap validate` in-process (click's CliRunner).
Dicts go through load_recipe (the Python API's path), --set overrides through the CLI. A case broken by
construction that is accepted fails its test. Only two tests draw cases that are not broken by construction and may
be valid (exit 0, then checked against load_recipe): arbitrary text or bytes, and odd --set overrides. The counts
tried are printed in pytest's closing summary (from a pytest-xdist worker too) and written to
$PREFIXCAP_RELIABILITY_COUNTS (JSON) when that is set.
"""

from __future__ import annotations

import copy
import datetime
import decimal
import os
import re
import reprlib
import string
import traceback
from collections import Counter, OrderedDict
from pathlib import Path
from types import MappingProxyType
from typing import Any, get_args

import pytest
import yaml
from annotated_types import Ge, Gt, Le, Lt
from click.testing import CliRunner
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from prefixcap import PrefixcapError, RecipeError, load_recipe
from prefixcap.cli import cli
from prefixcap.config import EvalConfig, GenerateConfig, ImageConfig, OutputConfig, TrainConfig
from prefixcap.recipe import SLOTS, Recipe
from prefixcap.registry import get_component, list_components

from conftest import report_in_summary, update_json

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = yaml.safe_load((REPO / "recipes" / "quickstart.yaml").read_text())  # valid: every case breaks a copy
MAX_LINE = 500
# No deadline: how long a case takes depends on what else the machine runs, so a time limit would fail at random;
# what keeps a bomb from expanding is the node limit, which the bomb tests check by its message.
FUZZ = settings(derandomize=True, database=None, deadline=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])  # fmt: skip
COUNTS: Counter[str] = Counter()  # cases tried, by kind and outcome


@pytest.fixture(scope="module", autouse=True)
def report_counts(request, tmp_path_factory):
    """Warm up (torch is imported by the first valid recipe, not inside a hypothesis deadline), then print and
    save how many cases were tried."""
    global _DIR
    _DIR = tmp_path_factory.mktemp("recipe-fuzz")
    _, result = validate(QUICKSTART)
    assert result.exit_code == 0, result.output
    COUNTS.clear()
    yield
    if not COUNTS:
        return
    total = sum(v for k, v in COUNTS.items() if k.endswith((":exit 2", ":exit 0")))
    invalid = sum(v for k, v in COUNTS.items() if k.endswith(":exit 2"))
    valid = ", ".join(f"{k.split(':')[0]} {v}" for k, v in sorted(COUNTS.items()) if k.endswith(":exit 0"))
    kinds: Counter[str] = Counter()
    for key, n in COUNTS.items():
        kinds[key.split(":")[0].split(" ")[0]] += n  # "regression <name>" counts as regression
    line = (f"recipe fuzz: {total} cases, {invalid} exit 2 with a clear error, {total - invalid} valid (exit 0, "
            f"{valid or 'none'}: cases not broken by construction); "
            + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())))
    report_in_summary(request.config, line)
    out = os.environ.get("PREFIXCAP_RELIABILITY_COUNTS")
    if out:
        update_json(Path(out), "recipes", {"cases": total, "exit_2": invalid, "exit_0": total - invalid,
                                          "by_kind": dict(COUNTS)})  # fmt: skip


# --- running the CLI and judging its answer ----------------------------------------------------------------------

_DIR = Path()  # where validate() writes the recipe; set by report_counts
_RUNNER = CliRunner(env={"PREFIXCAP_DEBUG": None, "COLUMNS": "120"})


def validate(recipe: str | bytes | dict, overrides: tuple[str, ...] = ()) -> tuple[Path, Any]:
    """`prefixcap validate FILE [--set ...]` in-process; ``recipe`` is YAML text, raw bytes, or a dict to dump."""
    path = _DIR / "recipe.yaml"
    if isinstance(recipe, dict):
        recipe = yaml.safe_dump(recipe, sort_keys=False, allow_unicode=True)
    if isinstance(recipe, str):
        recipe = recipe.encode("utf-8", errors="surrogatepass")  # a lone surrogate is then invalid UTF-8 bytes
    path.write_bytes(recipe)
    result = _RUNNER.invoke(cli, ["validate", str(path), *(f"--set={o}" for o in overrides)])
    return path, result


def check(kind: str, path: Path, result: Any, overrides: tuple[str, ...] = (), invalid: bool = True) -> None:
    """Exit 2 with a clear error. Only a case not broken by construction (``invalid=False``) may instead exit 0,
    and then load_recipe must accept it too."""
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        tb = "".join(traceback.format_exception(result.exception))
        pytest.fail(f"{kind}: {type(result.exception).__name__} escaped the CLI:\n{tb}")
    COUNTS[f"{kind}:exit {result.exit_code}"] += 1
    if result.exit_code == 0 and not invalid:
        load_recipe(path, overrides)  # raises if the CLI accepted a recipe the loader calls invalid
        return
    assert result.exit_code == 2, f"{kind}: exit {result.exit_code}\n{result.output}"
    check_error_text(result.stderr)
    assert result.stdout == "", result.stdout
    assert "Traceback" not in result.output


def check_error_text(stderr: str) -> None:
    assert stderr.startswith("error: "), stderr
    lines = stderr.splitlines()
    assert lines and len(lines) <= 200, stderr[:2000]
    for i, line in enumerate(lines):
        assert len(line) <= MAX_LINE, f"line {i} has {len(line)} characters: {line[:200]}..."
        assert line.isprintable(), f"line {i} holds control characters: {line!r}"
        if i:
            assert line.startswith("       "), f"continuation line {i} is not indented: {line!r}"


def check_message(kind: str, error: PrefixcapError) -> None:
    """A RecipeError from the Python API reads as the CLI would print it."""
    COUNTS[f"{kind}:exit 2"] += 1
    text = str(error)
    assert text.strip(), "empty error message"
    check_error_text("error: " + "\n       ".join(text.splitlines()))


# --- what a recipe may hold ----------------------------------------------------------------------------------------

SECTION_MODELS: dict[str, type[BaseModel]] = {"train": TrainConfig, "image": ImageConfig, "eval": EvalConfig,
                                              "generate": GenerateConfig, "output": OutputConfig}  # fmt: skip
COMPONENTS = {slot: get_component(kind, spec if isinstance(spec, str) else spec["name"]).options
              for slot, kind in SLOTS.items() if (spec := QUICKSTART.get(slot))}  # fmt: skip


def _models() -> list[tuple[tuple, type[BaseModel]]]:
    """(path in the quickstart recipe, pydantic model) of every section and component, nested models included."""
    found = [((name,), model) for name, model in SECTION_MODELS.items()]
    found += [((slot,), model) for slot, model in COMPONENTS.items()]
    found.append((("losses", 0), get_component("loss", "caption-ce").options))
    out = []
    while found:
        path, model = found.pop()
        out.append((path, model))
        for name, field in model.model_fields.items():
            for sub in (field.annotation, *get_args(field.annotation)):
                if isinstance(sub, type) and issubclass(sub, BaseModel):
                    found.append((path + (name,), sub))
    return out


MODELS = _models()


def _bounded_numbers() -> list[tuple[tuple, type, list]]:
    """(path, int or float, its bounds) of every number with a range in a section or the quickstart's components."""
    out = []
    for path, model in MODELS:
        for name, field in model.model_fields.items():
            types = {t for t in (field.annotation, *get_args(field.annotation)) if t in (int, float)}
            bounds = [m for m in field.metadata if isinstance(m, (Ge, Gt, Le, Lt))]
            if types and bounds:
                out.append((path + (name,), float if float in types else int, bounds))
    return sorted(out, key=str)


BOUNDED = _bounded_numbers()
TYPED = sorted(((path + (name,), field.annotation) for path, model in MODELS
                for name, field in model.model_fields.items() if field.annotation in (int, float, bool, str)),
               key=str)  # fmt: skip
LITERALS = [(("train", "precision"), ("fp32", "bf16", "fp16")),
            (("connector", "pool"), ("none", "avg", "pixel-shuffle")),
            (("decoder", "finetune"), ("lora", "full", "frozen"))]  # fmt: skip


def put(data: dict, path: tuple, value: Any) -> dict:
    data = copy.deepcopy(data)
    target = data
    for part in path[:-1]:
        if isinstance(target, dict) and isinstance(target.get(part), str) and part in SLOTS:
            target[part] = {"name": target[part]}  # `system: prefix` -> {name: prefix}
        elif isinstance(target, dict) and not isinstance(target.get(part), (dict, list)):
            target[part] = {}
        target = target[part]
    target[path[-1]] = value
    return data


# Any character at all, surrogates and control characters included.
ANY_CHAR = st.characters(codec=None, categories=None)
WEIRD_TEXT = st.one_of(
    st.text(ANY_CHAR, min_size=1, max_size=30),
    st.text(st.sampled_from("\x00\x1b\t\n\r\x85\u2028\ufeff\ud800\udfff[]/{}:&*!|>'\"#%@`,-?=. é中😀"),
            min_size=1, max_size=20),
    st.sampled_from(["[/]", "[/x]", "[bold]x", "\x1b[31mred", "a\nb", "<<", "=", "..", "", " ", "~", "null", "-1"]),
    st.text(st.sampled_from("ab"), min_size=600, max_size=3000),
)
LETTERS = st.text(st.sampled_from(string.ascii_letters + "_ "), min_size=1, max_size=12).filter(
    lambda s: not re.fullmatch(r"(?i)\s*[+-]?(inf|infinity|nan|y|yes|n|no|t|true|f|false|on|off)\s*", s))
NOT_A_NUMBER = st.one_of(LETTERS, st.lists(st.integers(), min_size=1, max_size=3),
                         st.dictionaries(st.sampled_from("abc"), st.integers(), min_size=1, max_size=2))
NOT_A_BOOL = st.one_of(LETTERS, st.integers(2, 10**6), st.floats(0.1, 0.9), st.lists(st.booleans(), min_size=1))
NOT_A_STR = st.one_of(st.integers(), st.floats(allow_nan=False), st.booleans(),
                      st.lists(st.integers(), min_size=1, max_size=3),
                      st.dictionaries(LETTERS, st.integers(), min_size=1))
HUGE = st.one_of(st.integers(10**9, 10**40), st.integers(-(10**40), -1), st.just(10**4300 - 1),
                 st.floats(1e16, 1e300))  # fmt: skip


def out_of_range(bounds: list, kind: type) -> st.SearchStrategy:
    """Numbers just past, or far past, a field's bounds."""
    options = []
    for b in bounds:
        if isinstance(b, (Ge, Gt)):
            low = b.ge if isinstance(b, Ge) else b.gt
            edge = low - (1 if kind is int else 1e-9) if isinstance(b, Ge) else low
            options += [st.just(edge), st.integers(-(10**30), int(low) - 1), st.just(-(10**400))]
        else:
            high = b.le if isinstance(b, Le) else b.lt
            edge = high + 1 if isinstance(b, Le) else high
            options += [st.just(edge), st.integers(int(high) + 1, int(high) + 10**30), st.just(10**400)]
    if kind is float:
        options += [st.sampled_from([float("inf"), float("-inf"), float("nan")])]
    return st.one_of(options)


def _known_keys(path: tuple) -> set[str]:
    for p, model in MODELS:
        if p == path:
            return set(model.model_fields) | {"name"}
    return set(Recipe.model_fields)


# --- broken recipes: each strategy breaks the valid quickstart in one way --------------------------------------------

@st.composite
def wrong_type(draw):
    path, annotation = draw(st.sampled_from(TYPED))
    value = draw({int: NOT_A_NUMBER, float: NOT_A_NUMBER, bool: NOT_A_BOOL, str: NOT_A_STR}[annotation])
    return put(QUICKSTART, path, value)


@st.composite
def wrong_literal(draw):
    path, choices = draw(st.sampled_from(LITERALS))
    value = draw(st.one_of(WEIRD_TEXT, NOT_A_STR).filter(lambda v: v not in choices))
    return put(QUICKSTART, path, value)


@st.composite
def wrong_section_type(draw):
    section = draw(st.sampled_from(sorted(Recipe.model_fields)))
    if section == "description":
        value = draw(NOT_A_STR)
    elif section == "losses":  # a list of components: anything else, or a list of things that are not components
        value = draw(st.one_of(st.just("caption-ce"), st.just({"name": "caption-ce"}), st.integers(),
                               st.lists(st.one_of(st.integers(), st.lists(st.integers())), min_size=1)))  # fmt: skip
    elif section in SLOTS:  # a name or a mapping; a list, a number or an empty name is wrong
        value = draw(st.one_of(st.integers(), st.floats(allow_nan=False), st.booleans(), st.just(""),
                               st.lists(st.text(max_size=5), min_size=1, max_size=3), st.just({"name": ""}),
                               st.just({"checkpoint": "tiny"})))  # fmt: skip
    else:
        value = draw(st.one_of(st.integers(), st.text(min_size=1), st.lists(st.integers(), min_size=1),
                               st.booleans()))  # fmt: skip
    return put(QUICKSTART, (section,), value)


@st.composite
def unknown_key(draw):
    path = draw(st.sampled_from([()] + [p for p, _ in MODELS]))
    key = draw(WEIRD_TEXT.filter(lambda k: k not in _known_keys(path) and k != "<<"))
    value = draw(st.one_of(st.integers(), WEIRD_TEXT, st.none()))
    return put(QUICKSTART, path + (key,), value) if path else {**QUICKSTART, key: value}


@st.composite
def unknown_component(draw):
    slot = draw(st.sampled_from(sorted(SLOTS)))
    name = draw(WEIRD_TEXT.filter(lambda n: n.strip() and n not in ("mlp", "smollm", "siglip", "shapes", "prefix")))
    return put(QUICKSTART, (slot, "name"), name)


@st.composite
def missing_required(draw):
    case = draw(st.sampled_from(["decoder-checkpoint", "component-name", "encoder", "decoder", "jsonl", "hf"]))
    data = copy.deepcopy(QUICKSTART)
    if case == "decoder-checkpoint":  # the generic causal-lm has no default checkpoint
        data["decoder"] = {k: v for k, v in data["decoder"].items() if k != "checkpoint"} | {"name": "causal-lm"}
    elif case == "component-name":
        slot = draw(st.sampled_from(["encoder", "connector", "decoder", "data"]))
        data[slot] = {k: v for k, v in data[slot].items() if k != "name"}
    elif case in ("encoder", "decoder"):  # the prefix system needs both
        del data[case]
    else:
        data["data"] = {"name": case}  # jsonl needs train:, hf needs path:
    return data


@st.composite
def number_out_of_range(draw):
    path, kind, bounds = draw(st.sampled_from(BOUNDED))
    return put(QUICKSTART, path, draw(out_of_range(bounds, kind)))


def yaml_text(data: dict, unicode: bool) -> str:
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=unicode, width=10**6)


@st.composite
def alias_bomb(draw):
    """Billion laughs: anchors of width w, each level w aliases of the one below, placed somewhere in a recipe."""
    width = draw(st.integers(3, 12))
    depth = draw(st.integers(2, 12))
    mapping = draw(st.booleans())
    levels = []
    for i in range(depth):
        inner = [f"*l{i - 1}" if i else "lol"] * width
        if mapping:
            body = "{" + ", ".join(f"k{j}: {x}" for j, x in enumerate(inner)) + "}"
        else:
            body = f"[{', '.join(inner)}]"
        levels.append(f"&l{i} {body}")
    where = draw(st.sampled_from(["description", "bombs", "train", "encoder", "decoder.lora.targets", "losses"]))
    text = yaml_text(QUICKSTART, False)
    anchors = "".join(f"a{i}: {lvl}\n" for i, lvl in enumerate(levels))
    last = f"*l{depth - 1}"
    if where == "decoder.lora.targets":
        return anchors + text.replace("  finetune: full\n", f"  lora: {{targets: {last}}}\n")
    if where == "losses":
        return anchors + re.sub(r"losses:\n(- .*\n)+", f"losses: [{last}]\n", text)
    return anchors + re.sub(rf"^{where}:.*\n((  |- ).*\n)*", "", text, flags=re.M) + f"{where}: {last}\n"


@st.composite
def self_reference(draw):
    where = draw(st.sampled_from(["description", "train", "encoder", "losses", "zzz"]))
    body = draw(st.sampled_from(["&a [*a]", "&a {x: *a}", "&a [1, [2, *a]]", "&a {name: siglip, x: [*a]}"]))
    text = re.sub(rf"^{where}:.*\n((  |- ).*\n)*", "", yaml_text(QUICKSTART, False), flags=re.M)
    return text + f"{where}: {body}\n"


@st.composite
def merge_bomb(draw):
    width = draw(st.integers(4, 10))
    depth = draw(st.integers(6, 10))
    lines = ["m0: &m0 {a: 1, b: 2}"]
    for i in range(1, depth):
        aliases = ", ".join([f"*m{i - 1}"] * width)
        lines.append(f"m{i}: &m{i} {{<<: [{aliases}], k{i}: [{aliases}]}}")
    return "\n".join(lines) + f"\ntrain: *m{depth - 1}\n"


@st.composite
def not_a_mapping(draw):
    return draw(st.one_of(
        st.lists(st.one_of(st.integers(), st.text(max_size=5)), max_size=4).map(lambda v: yaml.safe_dump(v)),
        st.one_of(st.integers(), st.floats(), st.text(min_size=1, max_size=20), st.booleans()).map(
            lambda v: yaml.safe_dump(v)),
        st.sampled_from(["", "~\n", "---\n", "...\n", "# only a comment\n", "--- |\n  a block\n", "!!binary aGk=\n",
                         "!!set {a, b}\n", "!!omap [{a: 1}]\n", "2024-01-01\n", "[]\n", "- - - []\n"]),
        # several documents: the second may be anything, even a valid recipe
        st.tuples(st.sampled_from(["a: 1\n", yaml_text(QUICKSTART, False)]),
                  st.sampled_from(["", "b: 2\n", yaml_text(QUICKSTART, False)])).map(lambda t: f"{t[0]}---\n{t[1]}"),
    ))  # fmt: skip


@st.composite
def with_tabs(draw):
    lines = yaml_text(QUICKSTART, False).splitlines(keepends=True)
    indented = [i for i, line in enumerate(lines) if line.startswith("  ")]
    for i in draw(st.lists(st.sampled_from(indented), min_size=1, max_size=4, unique=True)):
        lines[i] = "\t" + lines[i].lstrip(" ")
    return "".join(lines)


BAD_UTF8 = [b"\xff", b"\xfe\xff", b"\x80", b"\xc0\x80", b"\xc3\x28", b"\xe2\x82", b"\xed\xa0\x80", b"\xf4\x90\x80\x80",
            b"\xf8\x88\x80\x80\x80"]  # fmt: skip


@st.composite
def invalid_utf8(draw):
    text = yaml_text(QUICKSTART, True).encode()
    at = draw(st.integers(0, len(text)))
    return text[:at] + draw(st.sampled_from(BAD_UTF8)) + text[at:]


@st.composite
def forbidden_character(draw):
    """Characters YAML refuses anywhere in a stream (NUL, most C0 controls, DEL, U+FFFE)."""
    text = yaml_text(QUICKSTART, True)
    at = draw(st.integers(0, len(text)))
    bad = draw(st.sampled_from([chr(c) for c in [*range(0, 9), 11, 12, *range(14, 32), 0x7F, 0x9F]] + ["\ufffe"]))
    return text[:at] + bad + text[at:]


@st.composite
def deep_nesting(draw):
    depth = draw(st.integers(50, 3000))
    style = draw(st.sampled_from(["flow-list", "flow-map", "block-map", "block-list"]))
    if style == "flow-list":
        value = "[" * depth + "1" + "]" * depth
    elif style == "flow-map":
        value = "{a: " * depth + "1" + "}" * depth
    elif style == "block-map":
        depth = min(depth, 150)  # block style: the text grows as depth squared
        value = "".join(f"\n{'  ' * (i + 1)}a:" for i in range(depth)) + " 1"
    else:
        depth = min(depth, 150)
        value = "".join(f"\n{'  ' * (i + 1)}-" for i in range(depth)) + " 1"
    where = draw(st.sampled_from(["description", "train", "encoder", "losses", "nested"]))
    text = re.sub(rf"^{where}:.*\n((  |- ).*\n)*", "", yaml_text(QUICKSTART, False), flags=re.M)
    return text + f"{where}: {value}\n"


@st.composite
def bad_tag(draw):
    tagged = draw(st.sampled_from([
        "!!int abc", "!!int 0x", "!!float abc", "!!bool maybe", "!!timestamp yesterday", "!!binary a",
        "!!null x", "!!int " + "9" * 5000, "!!python/object/apply:os.system ['true']", "!!python/name:os.system",
        "!custom 1", "!<tag:example.com,2000:x> 1", "!!map [1, 2]", "!!seq {a: 1}", "!!str [a]", "!!merge 1",
    ]))  # fmt: skip
    path = draw(st.sampled_from([("train", "lr"), ("description",), ("decoder", "lora"), ("zzz",)]))
    placeholder = "PLACEHOLDER-VALUE"
    return yaml_text(put(QUICKSTART, path, placeholder), False).replace(placeholder, tagged)


BROKEN = {
    "wrong_type": wrong_type(), "wrong_literal": wrong_literal(), "wrong_section_type": wrong_section_type(),
    "unknown_key": unknown_key(), "unknown_component": unknown_component(), "missing": missing_required(),
    "out_of_range": number_out_of_range(), "alias_bomb": alias_bomb(), "self_reference": self_reference(),
    "merge_bomb": merge_bomb(), "not_a_mapping": not_a_mapping(), "tabs": with_tabs(), "invalid_utf8": invalid_utf8(),
    "forbidden_character": forbidden_character(), "deep_nesting": deep_nesting(), "bad_tag": bad_tag(),
}  # fmt: skip


@st.composite
def broken_recipe(draw):
    kind = draw(st.sampled_from(sorted(BROKEN)))
    case = draw(BROKEN[kind])
    if isinstance(case, dict):  # dumped as YAML text, sometimes with raw unicode, sometimes all escaped
        case = yaml_text(case, draw(st.booleans()))
    return kind, case


@settings(FUZZ, max_examples=600)
@given(broken_recipe())
def test_broken_recipe_text_gives_exit_2_and_a_clear_error(case):
    kind, text = case
    path, result = validate(text)
    check(kind, path, result)


@settings(FUZZ, max_examples=120)
@given(st.one_of(st.text(ANY_CHAR, max_size=200), st.binary(max_size=200),
                 st.text(st.sampled_from("ab: -[]{},&*!|>'\"#\n\t ~"), max_size=200)))
def test_arbitrary_text_or_bytes_as_a_recipe(text):
    """Not broken by construction: may by chance be valid YAML, even a valid recipe, which must then exit 0 and
    load."""
    path, result = validate(text)
    check("arbitrary", path, result, invalid=False)


# --- --set overrides ---------------------------------------------------------------------------------------------

KEY_PART = st.one_of(
    st.sampled_from(sorted(Recipe.model_fields) + ["lr", "name", "lora", "r", "targets", "0", "1", "99", "x"]),
    WEIRD_TEXT.map(lambda s: s.replace("=", "")),
    st.sampled_from(["²", "٣", "9" * 5000, "-1", " ", ""]),
)
VALUE = st.one_of(
    WEIRD_TEXT, st.integers().map(str), st.sampled_from(["[" * 3000 + "]" * 3000, "{a: " * 500 + "1" + "}" * 500,
                                                          "1" * 5000, "!!int x", "&a [*a]", "[", "}", "a: b: c",
                                                          "---\n---", "!!python/object/apply:os.system ['true']"]),
    st.builds(lambda w, d: "[" + ", ".join(f"&l{i} [{', '.join([f'*l{i - 1}' if i else 'lol'] * w)}]" for i in range(d))
              + "]", st.integers(2, 10), st.integers(1, 10)),  # an alias bomb, big or small
)  # fmt: skip


@st.composite
def odd_override(draw):
    parts = draw(st.lists(KEY_PART, min_size=1, max_size=4))
    key = ".".join(parts)
    form = draw(st.sampled_from(["k=v", "k", "=v", "k==v", "k=v=w"]))
    value = draw(VALUE)
    return {"k=v": f"{key}={value}", "k": key, "=v": f"={value}", "k==v": f"{key}=={value}",
            "k=v=w": f"{key}={value}={value}"}[form]  # fmt: skip


@st.composite
def invalid_override(draw):
    """Overrides that are invalid by construction: an unknown section or option, or a value of the wrong type."""
    how = draw(st.sampled_from(["unknown-section", "unknown-option", "wrong-type", "out-of-range", "bomb", "deep"]))
    if how == "unknown-section":
        key = draw(WEIRD_TEXT.map(lambda s: s.replace("=", "").replace(".", "")).filter(
            lambda k: k.strip() and k.strip() not in Recipe.model_fields and not k.strip().isdigit()))
        return f"{key}={draw(VALUE)}"
    if how == "unknown-option":
        path = draw(st.sampled_from([p for p, _ in MODELS]))
        key = draw(LETTERS.map(lambda s: s.replace(" ", "")).filter(lambda k: k and k not in _known_keys(path)))
        return ".".join(map(str, path + (key,))) + "=1"
    if how == "wrong-type":
        path, annotation = draw(st.sampled_from([t for t in TYPED if t[1] in (int, float)]))
        value = draw(st.sampled_from(["[1, 2]", "{a: 1}", "abc", "'1 2'", "!!binary aGk="]))
        return ".".join(map(str, path)) + "=" + value
    if how == "out-of-range":
        path, kind, bounds = draw(st.sampled_from(BOUNDED))
        value = draw(out_of_range(bounds, kind))
        text = {float("inf"): ".inf", float("-inf"): "-.inf"}.get(value, ".nan" if value != value else str(value))
        return ".".join(map(str, path)) + "=" + text
    if how == "bomb":
        path, _ = draw(st.sampled_from(TYPED))
        levels = [f"&{c} [{','.join([f'*{p}' if p else 'x'] * 10)}]" for p, c in zip(["", *"abcd"], "abcde")]
        bomb = "[" + ", ".join(levels) + ", [" + ",".join(["*e"] * 10) + "]]"  # 10**6 x's
        return ".".join(map(str, path)) + "=" + bomb
    path, _ = draw(st.sampled_from(TYPED))
    return ".".join(map(str, path)) + "=" + "[" * 2000 + "]" * 2000


@settings(FUZZ, max_examples=200)
@given(st.lists(invalid_override(), min_size=1, max_size=3), st.lists(odd_override(), max_size=2))
def test_invalid_set_overrides_give_exit_2(invalid, odd):
    overrides = tuple(odd + invalid)  # the invalid ones last: an odd one cannot undo them
    path, result = validate(QUICKSTART, overrides)
    check("override", path, result, overrides)


@settings(FUZZ, max_examples=120)
@given(st.lists(odd_override(), min_size=1, max_size=3))
def test_odd_set_overrides(overrides):
    """Not broken by construction: keys and values of every shape, most of them errors, a few valid
    (`--set description=...`), which must then exit 0 and load."""
    overrides = tuple(overrides)
    path, result = validate(QUICKSTART, overrides)
    check("odd_override", path, result, overrides, invalid=False)


# --- dicts (the Python API: load_recipe / compose take a mapping) -------------------------------------------------


class BadRepr:
    def __repr__(self):
        raise RuntimeError("no repr for you")

    __str__ = __repr__


def shared_bomb(width: int, depth: int) -> list:
    level: list = ["lol"] * width
    for _ in range(depth - 1):
        level = [level] * width  # the same list object, width times: tiny in memory, width**depth when walked
    return level


def cycle() -> dict:
    d: dict = {"name": "siglip"}
    d["self"] = d
    return d


def nested(depth: int) -> list:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


PY_VALUES = st.one_of(
    st.sampled_from([(1, 2), {1, 2}, frozenset({"a"}), b"bytes", bytearray(b"x"), 1j, decimal.Decimal("1.5"),
                     datetime.date(2020, 1, 1), float("nan"), float("inf"), 10**5000, -(10**5000), BadRepr(), object(),
                     None, Ellipsis, range(3), MappingProxyType({"a": 1}), OrderedDict(a=1)]),
    st.builds(shared_bomb, st.integers(3, 10), st.integers(6, 9)),
    st.builds(nested, st.integers(101, 3000)), st.just(cycle()), WEIRD_TEXT,
)  # fmt: skip
PY_KEYS = st.one_of(WEIRD_TEXT, st.integers(), st.none(), st.tuples(st.integers()), st.booleans(), st.just(BadRepr()))


# A dict from Python is the API, and pydantic's lax mode converts some values a YAML file never holds: UTF-8 bytes
# to a str, a Decimal to a float (or to an int when whole), text that reads as a number or a yes/no to a number or a
# bool. A caller passing those gets a valid recipe (test_python_values_that_convert_are_accepted), so they never
# count as breaking a field. Nor does None for a section that may be absent, or a real component's name. (They are
# left out with assume(), not .filter(): hypothesis prints a strategy whose filter rejects an element of a
# sampled_from, and PY_VALUES holds values that cannot be printed.)
BOOL_WORDS = re.compile(r"(?i)\s*(0|1|y|yes|n|no|t|true|f|false|on|off)\s*")
OPTIONAL_SECTIONS = {name for name, field in Recipe.model_fields.items() if type(None) in get_args(field.annotation)}
COMPONENT_NAMES = {r.name for r in list_components()}


def converts(value: Any, annotation: Any) -> bool:
    """Whether pydantic's lax mode may turn ``value`` into a valid ``annotation`` (erring towards yes)."""
    if annotation is str:
        return isinstance(value, (str, bytes, bytearray))
    if isinstance(value, decimal.Decimal):
        return annotation is float or (value.is_finite() and value == value.to_integral_value())
    if isinstance(value, str):
        try:
            float(value)
            return True
        except ValueError:
            return annotation is bool and BOOL_WORDS.fullmatch(value) is not None
    return False


def breaks_section(section: str, value: Any) -> bool:
    if section == "description":
        return not converts(value, str)
    if section in OPTIONAL_SECTIONS and value is None:
        return False
    return not (isinstance(value, str) and value in COMPONENT_NAMES)


def shown(value: Any) -> str:
    """A short repr that never fails (a 5000-digit int, BadRepr)."""
    try:
        return reprlib.repr(value)
    except Exception:  # an int too long to print, or BadRepr
        return f"<{type(value).__name__}>"


@st.composite
def broken_dict(draw) -> tuple[dict, str, str]:
    """(a recipe dict broken in one place, the top-level section broken, what was broken)."""
    how = draw(st.sampled_from(["value", "key", "section", "component"]))
    if how == "value":  # a Python value where a number, string or bool belongs
        path, annotation = draw(st.sampled_from(TYPED))
        value = draw(PY_VALUES)
        assume(not converts(value, annotation))
        return put(QUICKSTART, path, value), path[0], f"{'.'.join(map(str, path))} = {shown(value)}"
    if how == "key":  # a key that is not a string, or not a known one
        path = draw(st.sampled_from([()] + [p for p, _ in MODELS]))
        key = draw(PY_KEYS.filter(lambda k: not isinstance(k, str) or k not in _known_keys(path)))
        target = put(QUICKSTART, path + ("__x__",), 1) if path else {**QUICKSTART, "__x__": 1}
        holder = target
        for part in path:
            holder = holder[part]
        del holder["__x__"]
        holder[key] = draw(st.one_of(st.integers(), PY_VALUES))
        where = (*path, shown(key))
        return target, path[0] if path else key, f"unknown key {'.'.join(map(str, where))}"
    if how == "section":
        section = draw(st.sampled_from(sorted(Recipe.model_fields)))
        value = draw(PY_VALUES)
        assume(breaks_section(section, value))
        return {**QUICKSTART, section: value}, section, f"{section} = {shown(value)}"
    slot = draw(st.sampled_from(sorted(SLOTS)))
    name = draw(st.one_of(PY_VALUES, PY_KEYS))
    assume(not (isinstance(name, str) and name in COMPONENT_NAMES))
    return put(QUICKSTART, (slot, "name"), name), slot, f"{slot}.name = {shown(name)}"


def top_key(override: str) -> str:
    return override.partition("=")[0].split(".")[0].strip()


@st.composite
def broken_dict_and_overrides(draw) -> tuple[dict, str, tuple[str, ...]]:
    data, section, what = draw(broken_dict())
    # An odd override may set the very section the dict breaks (`connector=null`, `description=x`) and so mend it;
    # an invalid one is broken itself, wherever it points.
    odd = odd_override().filter(lambda o: top_key(o) != section)
    overrides = draw(st.lists(st.one_of(invalid_override(), odd), max_size=2))
    return data, what, tuple(overrides)


@settings(FUZZ, max_examples=250)
@given(broken_dict_and_overrides())
def test_broken_dicts_give_a_recipe_error(case):
    """load_recipe(dict): shared-reference bombs, cycles, deep nesting, odd Python types and keys."""
    data, what, overrides = case
    try:
        load_recipe(data, overrides)
    except PrefixcapError as e:  # a RecipeError, or a PluginError (a clash, an unknown plugin): both clear errors
        check_message("dict", e)
        return
    pytest.fail(f"load_recipe accepted a broken dict ({what}) with overrides {shown(overrides)}")


def test_python_values_that_convert_are_accepted():
    """What the generator above leaves out as valid, valid indeed: the Python API takes what pydantic converts."""
    data = put(put(QUICKSTART, ("train", "lr"), decimal.Decimal("0.5")), ("decoder", "prompt"), b"a photo of")
    recipe = load_recipe({**data, "description": bytearray(b"bytes"), "connector": None,
                          "eval": OrderedDict(every_steps=7), "encoder": {"name": "siglip", "unfreeze_last": "1"}})
    assert (recipe.train.lr, recipe.description, recipe.connector, recipe.eval.every_steps) == (0.5, "bytes", None, 7)
    assert (recipe.decoder.options.prompt, recipe.encoder.options.unfreeze_last) == ("a photo of", 1)
    # but not an integer too long to write out, which only a dict can hold (YAML and --set refuse to read one)
    with pytest.raises(RecipeError, match=r"^train.grad_accum: an integer of more than 4300 digits"):
        load_recipe(put(QUICKSTART, ("train", "grad_accum"), 10**5000))


# --- the bugs the fuzzer found, kept as plain examples ----------------------------------------------------------

REGRESSIONS = {
    # YAML text that used to escape load_recipe as a RecursionError, ValueError, KeyError, AttributeError or ReaderError
    "self-referencing alias": ("a: &a [*a]\n", (), "an alias refers to itself"),
    "deep flow list": ("train: " + "[" * 5000 + "]" * 5000 + "\n", (), "nested deeper than 100 levels"),
    "5000-digit integer": ("train: {seed: " + "1" * 5000 + "}\n", (), ":1: invalid YAML: cannot read '111"),
    "!!bool maybe": ("train: {cache_features: !!bool maybe}\n", (), "cannot read 'maybe' as bool"),
    "!!timestamp": ("train:\n  lr: !!timestamp xyz\n", (), ":2: invalid YAML: cannot read 'xyz' as timestamp"),
    "NUL byte": ("train: {lr: 1}\ndescription: a\x00b\n", (), ":2: invalid YAML: character #x0000"),
    # a set of losses used to pass validation with its options unchecked, then fail with KeyError
    "losses as a set": ("losses: !!set {caption-ce}\n", (), "losses: Value error, expected a list of loss components"),
    # rich markup in a key used to crash the error printer (MarkupError)
    "markup in a key": ("'[/x]': 1\n", (), "[/x]: unknown section '[/x]'"),
    "control characters in a key": ('"a\\x1b[31mb\\nc": 1\n', (), "a\\x1b[31mb\\nc: unknown section"),
    "10k-character component name": ("encoder: " + "x" * 10_000 + "\n", (), "unknown encoder 'xxxx"),
    "inf learning rate": ("train: {lr: .inf}\n", (), "train.lr: Input should be a finite number; got inf"),
    "seed past what torch takes": ("train: {seed: 100000000000000000000}\n", (), "less than or equal to 4294967295"),
    # --set: int('²') raised ValueError; values were parsed with no alias or depth limit
    "superscript digit in a --set key": ("{}\n", ("losses.²=1",), "--set losses.²"),
    "alias bomb in a --set value": (
        "{}\n", ("description=[&a [x,x,x,x,x,x,x,x,x,x], &b [*a,*a,*a,*a,*a,*a,*a,*a,*a,*a], &c [*b,*b,*b,*b,*b,*b,*b,"
                 "*b,*b,*b], &d [*c,*c,*c,*c,*c,*c,*c,*c,*c,*c], &e [*d,*d,*d,*d,*d,*d,*d,*d,*d,*d], [*e,*e]]",),
        "expands without bound"),  # fmt: skip
    "deep --set value": ("{}\n", ("train.lr=" + "[" * 3000 + "]" * 3000,), "nested deeper than 100 levels"),
    "past the end of a list": ("{}\n", ("losses.5=x",), "losses.5 is past the end of losses (0 items)"),
}


@pytest.mark.parametrize("name", REGRESSIONS)
def test_inputs_that_used_to_crash_give_exit_2(name):
    text, overrides, expected = REGRESSIONS[name]
    path, result = validate(text, overrides)
    check(f"regression {name}", path, result, overrides)
    assert expected in result.stderr, result.stderr


def test_a_recipe_name_too_long_for_the_file_system_is_an_error_not_a_traceback():
    result = _RUNNER.invoke(cli, ["validate", "a" * 300])  # Path.exists() raised OSError ENAMETOOLONG
    assert result.exit_code == 2 and "no such recipe file or name" in result.stderr
    check_error_text(result.stderr)


def test_python_tags_never_run_code(tmp_path):
    marker = tmp_path / "marker"
    text = f"description: !!python/object/apply:os.system ['touch {marker}']\n"
    path, result = validate(text)
    check("python tag", path, result)
    assert "could not determine a constructor" in result.stderr and not marker.exists()
    # not YAML that SafeLoader reads, so the override's value is the text itself: not a number
    path, result = validate(QUICKSTART, (f"train.lr=!!python/object/apply:os.system ['touch {marker}']",))
    check("python tag", path, result)
    assert "train.lr: Input should be a valid number" in result.stderr and not marker.exists()


@pytest.mark.parametrize("make", [lambda: shared_bomb(10, 9), cycle, lambda: nested(5000),
                                  lambda: {"train": {"steps": 10**5000}}])  # fmt: skip
def test_dict_sources_with_bombs_cycles_and_huge_numbers(make):
    value = make()
    data = value if isinstance(value, dict) and "train" in value else {**QUICKSTART, "description": value}
    with pytest.raises(RecipeError) as e:
        load_recipe(data)
    check_message("dict regression", e.value)


def test_alias_bomb_is_refused_before_it_expands():
    """The node limit counts what the aliases expand to, so 10**9 laughs are refused after 100,000."""
    levels = "".join(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}' if i else 'lol'] * 10)}]\n" for i in range(9))
    path, result = validate(levels)
    check("bomb", path, result)
    assert "expands without bound (over 100000 YAML nodes)" in result.stderr


def test_error_lines_are_all_reported_and_indented():
    """Several problems: the first line after 'error:', one indented line per further problem."""
    data = put(put(put(QUICKSTART, ("train", "lr"), "fast"), ("train", "steps"), -1), ("zzz",), 1)
    path, result = validate(data)
    check("several", path, result)
    lines = result.stderr.splitlines()
    assert len(lines) == 3 and lines[0].startswith("error: ") and all(x.startswith("       ") for x in lines[1:])
