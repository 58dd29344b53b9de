"""Recipes: YAML (or dicts) validated by pydantic, with errors that point at the YAML line.

A recipe has the sections ``system, encoder, connector, decoder, losses, data, train, eval, generate, output``.
Each component section is ``{name: ..., checkpoint: ..., **options}`` (or just the name); its options are
validated by the options model the component registered, so a plugin owns its own schema.
"""

from __future__ import annotations

import os
import re
import reprlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from prefixcap.errors import PluginError, RecipeError, UnknownComponentError, first_line, summary
from prefixcap.registry import ComponentOptions, get_component

Loc = tuple[str | int, ...]
_MAX_YAML_NODES = 100_000  # an alias bomb expands past this long before it costs memory
_MAX_DEPTH = 100  # a recipe nests 4 levels deep; far deeper is a mistake or an attack (or an alias to itself)
_MAX_LINE = 400  # longest line of an error message: long keys and values are shortened, never printed whole
_MAX_INT_DIGITS = 4300  # Python's default int<->str limit: past it a number cannot be written out or read back
_INT_LIMIT = 10**_MAX_INT_DIGITS


class _Section(BaseModel):
    # inf and nan are never a sensible rate, size or budget (`lr: .inf` would train to NaN)
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), allow_inf_nan=False)


class ComponentSpec(BaseModel):
    """``{name, **options}``: the options are checked against the component's own model by ``resolve``."""

    model_config = ConfigDict(extra="allow")

    name: str = Field(min_length=1, strict=True)  # not bytes: load_recipe only looks up names that are str
    _options: ComponentOptions | None = PrivateAttr(default=None)

    @model_validator(mode="before")
    @classmethod
    def _name_shorthand(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value

    @property
    def raw_options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})

    @property
    def options(self) -> ComponentOptions:
        if self._options is None:
            raise RuntimeError(f"component {self.name!r} has not been resolved; use load_recipe()")
        return self._options


class TrainConfig(_Section):
    lr: float = Field(1e-3, gt=0)
    batch_size: int = Field(32, ge=1, le=1_000_000, description="examples per micro-batch (a step takes grad_accum "
                            "of them) over all processes together: a data-parallel run (torchrun, accelerate launch) "
                            "splits each evenly over its processes, so it must be divisible by their number")  # fmt: skip
    steps: int = Field(1000, ge=1, le=100_000_000)
    # A wall-clock budget besides steps: training stops once this many seconds were spent in training steps
    # (evaluation and checkpoints not counted). The LR schedule still spans train.steps.
    max_seconds: float | None = Field(None, gt=0)
    grad_accum: int = Field(1, ge=1)
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    max_caption_tokens: int = Field(32, ge=1, le=4096)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    seed: int = Field(0, ge=0, le=2**32 - 1)
    # A frozen encoder's features are computed once, cached on disk, and reused by every epoch and run.
    cache_features: bool = True
    cache_dtype: Literal["fp16", "bf16", "fp32"] = Field("fp16", description="how cached features are stored: fp16 "
                                                         "halves the disk of fp32 (docs/data.md)")  # fmt: skip
    num_workers: Annotated[int, Field(ge=0, le=64)] | Literal["auto"] = Field(
        "auto", description="DataLoader processes decoding images (0: in the training process); auto: all cores "
        "but one, at most 8, while images are decoded, none while cached features are read")


class EvalConfig(_Section):
    batch_size: int = Field(32, ge=1)
    every_steps: int | None = Field(None, ge=1)  # None: only at the end
    max_examples: int | None = Field(None, ge=1)
    metric: str = "loss"  # the validation metric that picks the best step and drives early stopping
    higher_is_better: bool = False
    patience: int | None = Field(None, ge=0)  # evaluations without improvement before stopping; None: never
    # CLIPScore's model: "auto" takes the data's own scorer (shapes: the bundled prefixcap/shapes-clip) or else the
    # paper's CLIP ViT-B/32; any transformers CLIP/SigLIP id or directory, or open_clip:<model>/<tag>; null: none.
    clip_model: str | None = "auto"


class GenerateConfig(_Section):
    """Greedy by default: alt text should be the model's best guess, not a random draw (distilvit2 sampled)."""

    max_new_tokens: int = Field(32, ge=1, le=4096)
    num_beams: int = Field(1, ge=1, le=64)
    do_sample: bool = False
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int | None = Field(None, ge=1)
    repetition_penalty: float = Field(1.0, gt=0)
    # Greedy search through prefixcap.decoding's loop instead of transformers' generate: the same ids, without
    # generate's per-step machinery (prefix systems; beams and sampling always go through generate).
    fast: bool = True


class OutputConfig(_Section):
    dir: str = "runs/{recipe}"
    save_every_steps: int | None = Field(None, ge=1)  # None: at the end only
    keep_last: int = Field(2, ge=1)
    log_every_steps: int = Field(10, ge=1)
    tensorboard: bool | None = None  # scalars in <run dir>/tensorboard/; None: when tensorboard is installed


SLOTS: dict[str, str] = {"system": "system", "encoder": "encoder", "connector": "connector", "decoder": "decoder",
                         "data": "dataset"}  # fmt: skip


class Recipe(_Section):
    description: str = ""
    system: ComponentSpec = ComponentSpec(name="prefix")
    encoder: ComponentSpec | None = None
    connector: ComponentSpec | None = None
    decoder: ComponentSpec | None = None
    losses: list[ComponentSpec] = Field(default_factory=lambda: [ComponentSpec(name="caption-ce")])
    data: ComponentSpec | None = None
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    generate: GenerateConfig = GenerateConfig()
    output: OutputConfig = OutputConfig()

    @field_validator("losses", mode="before")
    @classmethod
    def _losses_are_a_list(cls, value: Any) -> Any:
        # pydantic would also take a set or a tuple; their items would then miss the options check in load_recipe
        if not isinstance(value, list):
            raise ValueError("expected a list of loss components, e.g. [{name: caption-ce}]")
        return value

    _source: str = PrivateAttr(default="<dict>")
    _lines: dict[Loc, int] = PrivateAttr(default_factory=dict)
    _overridden: set[Loc] = PrivateAttr(default_factory=set)

    @property
    def source(self) -> str:
        return self._source

    def to_dict(self, resolved: bool = False) -> dict[str, Any]:
        """A plain dict load_recipe accepts: the options as written, or (``resolved``) every option spelled out
        with its default, as JSON, so a later prefixcap whose defaults changed still rebuilds the same system."""
        mode = "json" if resolved else "python"
        data = self.model_dump(mode=mode, exclude_unset=not resolved, exclude=set(SLOTS) | {"losses"})

        def part(spec: ComponentSpec) -> dict[str, Any]:
            return {"name": spec.name, **(spec.options.model_dump(mode="json") if resolved else spec.raw_options)}

        data.update({slot: part(spec) for slot in SLOTS if (spec := getattr(self, slot)) is not None})
        data["losses"] = [part(s) for s in self.losses]
        return data

    def location(self, loc: Loc) -> str:
        """``file:line`` (or ``--set key``) of the closest recipe entry at or above ``loc``, for error messages."""
        return _location(self._source, self._lines, self._overridden, loc)

    def components(self) -> list[tuple[Loc, str, ComponentSpec]]:
        """(location in the recipe, kind, spec) of every component section that is present."""
        found: list[tuple[Loc, str, ComponentSpec]] = [
            ((slot,), kind, spec) for slot, kind in SLOTS.items() if (spec := getattr(self, slot)) is not None
        ]
        found += [(("losses", i), "loss", spec) for i, spec in enumerate(self.losses)]
        return found


# --- YAML with line numbers ------------------------------------------------------------------------------------


class _TooBig(RecipeError):
    """A document past the node or depth limit: refused outright, never read as a plain string by --set."""


def _parse_yaml(text: str, source: str) -> tuple[Any, dict[Loc, int]]:
    """Parse YAML safely; also return the 1-based line of every mapping key / sequence item.

    Whatever the text, the outcome is data or a RecipeError: PyYAML's own errors, the plain exceptions its
    constructors raise on bad tagged scalars (``!!int x``, a 5000-digit integer), nesting deeper than Python's
    stack, self-referencing aliases and alias bombs."""
    loader = None
    try:
        loader = _Loader(text)  # checks every character first
        node = loader.get_single_node()
        lines: dict[Loc, int] = {}
        if node is not None:
            _index_lines(node, (), lines, [0])
        data = loader.construct_document(node) if node is not None else None
    except _TooBig as e:
        raise _TooBig(f"{source}: {e}") from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{source}:{mark.line + 1}" if mark else source
        raise RecipeError(_one_line(f"{where}: invalid YAML: {e.problem or e.context or summary(e)}")) from None
    except yaml.reader.ReaderError as e:  # a character YAML does not allow (NUL, most control characters)
        line = text.count("\n", 0, e.position) + 1 if isinstance(e.position, int) else None
        where = f"{source}:{line}" if line else source
        raise RecipeError(_one_line(f"{where}: invalid YAML: character #x{e.character:04x}: {e.reason}")) from None
    except RecursionError:
        raise _TooBig(f"{source}: invalid YAML: nested deeper than {_MAX_DEPTH} levels") from None
    except Exception as e:  # yaml.YAMLError, or ValueError/KeyError/... from a constructor given a bad scalar
        raise RecipeError(_one_line(f"{source}: invalid YAML: {summary(e)}")) from None
    finally:
        if loader is not None:
            loader.dispose()
    return data, lines


class _Loader(yaml.SafeLoader):
    _depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        """The composer recurses once per level: refuse deep nesting before Python's stack runs out (a
        RecursionError is caught too, but unwinding a thousand frames takes a second)."""
        self._depth += 1
        try:
            if self._depth > _MAX_DEPTH:
                line = self.peek_event().start_mark.line + 1
                raise _TooBig(f"invalid YAML: nested deeper than {_MAX_DEPTH} levels (at line {line})")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        """SafeLoader's, but a scalar its constructor cannot read (``!!int x``, ``!!bool maybe``, an integer of
        5000 digits) is a YAML error at the scalar's line, not a bare ValueError or KeyError."""
        try:
            return super().construct_object(node, deep)
        except (ValueError, TypeError, KeyError, AttributeError, OverflowError, IndexError) as e:
            what = _short(node.value) if isinstance(node, yaml.ScalarNode) else f"this {type(node).__name__}"
            tag = str(node.tag).rsplit(":", 1)[-1]
            problem = f"cannot read {what} as {tag}: {type(e).__name__}: {summary(e)}"
            raise yaml.constructor.ConstructorError(None, None, problem, node.start_mark) from None


def _index_lines(node: yaml.Node, loc: Loc, lines: dict[Loc, int], count: list[int]) -> None:
    count[0] += 1
    if count[0] > _MAX_YAML_NODES:
        raise _TooBig(f"recipe is too large or expands without bound (over {_MAX_YAML_NODES} YAML nodes)")
    if len(loc) > _MAX_DEPTH:  # also what an alias to an enclosing node (`a: &a [*a]`) looks like
        raise _TooBig(f"recipe nests deeper than {_MAX_DEPTH} levels, or an alias refers to itself "
                      f"(at line {node.start_mark.line + 1})")
    lines.setdefault(loc, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            # a complex key (a list or mapping) is refused when constructed; never render it (it may be a bomb)
            child = loc + (str(key.value) if isinstance(key, yaml.ScalarNode) else "?",)
            lines[child] = key.start_mark.line + 1
            _index_lines(value, child, lines, count)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _index_lines(item, loc + (i,), lines, count)


# --- overrides -------------------------------------------------------------------------------------------------


def apply_override(data: dict[str, Any], assignment: str) -> Loc:
    """Apply ``a.b.c=value`` (value parsed as YAML) to a recipe dict in place; returns the location set."""
    key, eq, raw = assignment.partition("=")
    parts = [p.strip() for p in key.strip().split(".")]
    shown = _short(assignment, 100)
    if not eq or not all(parts):
        raise RecipeError(_one_line(f"--set {shown}: expected KEY=VALUE with a dotted key, e.g. train.lr=3e-4"))
    try:
        value = _parse_yaml(raw, "--set")[0] if raw.strip() else ""
    except _TooBig as e:  # an alias bomb or a deeply nested value is refused, not kept as a string
        raise RecipeError(_one_line(f"--set {shown}: {str(e).removeprefix('--set: ')}")) from None
    except RecipeError:
        value = raw  # not YAML: the text itself (`--set description=a: b`)
    # An index is a plain ASCII number (int() would take '٣' or fail on '²' and 5000 digits); anything else is a key.
    loc: Loc = tuple(int(p) if re.fullmatch(r"[0-9]{1,9}", p) else p for p in parts)
    target: Any = data
    for i, part in enumerate(loc[:-1]):
        nxt = loc[i + 1]
        if isinstance(target, dict):
            if isinstance(target.get(part), str) and part in SLOTS:  # `encoder: siglip` shorthand -> mapping
                target[part] = {"name": target[part]}
            target = target.setdefault(part, [] if isinstance(nxt, int) else {})
        elif isinstance(target, list) and isinstance(part, int) and part < len(target):
            target = target[part]
        else:
            raise RecipeError(_one_line(f"--set {shown}: {_cannot_set(loc, i, target)}"))
    last = loc[-1]
    if isinstance(target, dict):
        target[last] = value
    elif isinstance(target, list) and isinstance(last, int) and last <= len(target):
        target[last:last + 1] = [value]
    else:
        raise RecipeError(_one_line(f"--set {shown}: {_cannot_set(loc, len(loc) - 1, target)}"))
    return loc


def _cannot_set(loc: Loc, n: int, target: Any) -> str:
    """Why ``loc[n]`` cannot be set inside ``target``, the value at ``loc[:n]``."""
    if isinstance(target, list):
        if isinstance(loc[n], int):
            return f"{_dotted(loc[: n + 1])} is past the end of {_dotted(loc[:n])} ({len(target)} items)"
        return f"{_dotted(loc[:n])} is a list: {_short(loc[n])} is not an index"
    return f"{_dotted(loc[:n])} is not a section (it holds {type(target).__name__} {_short(target)})"


# --- loading ---------------------------------------------------------------------------------------------------


def recipe_dirs() -> list[Path]:
    """Where recipe names are looked up: $PREFIXCAP_RECIPES (os.pathsep-separated), ./recipes, the bundled ones."""
    dirs = [Path(p) for p in os.environ.get("PREFIXCAP_RECIPES", "").split(os.pathsep) if p]
    dirs += [Path.cwd() / "recipes", Path(__file__).resolve().parent.parent / "recipes"]
    unique: list[Path] = []
    for d in dirs:
        if d.is_dir() and d.resolve() not in [u.resolve() for u in unique]:
            unique.append(d)
    return unique


def list_recipes() -> list[tuple[str, Path, str]]:
    """(name, path, description) of every recipe on the search path; earlier directories shadow later ones."""
    found: dict[str, tuple[str, Path, str]] = {}
    for d in recipe_dirs():
        for path in sorted(d.glob("*.yaml")):
            if path.stem in found:
                continue
            try:
                data, _ = _parse_yaml(path.read_text(encoding="utf-8"), str(path))
                description = str(data.get("description", "")) if isinstance(data, dict) else ""
            except (RecipeError, OSError) as e:
                description = f"(unreadable: {e})"
            found[path.stem] = (path.stem, path, first_line(description))
    return list(found.values())


def find_recipe(name_or_path: str | Path) -> Path:
    path = Path(name_or_path)
    if _exists(path):
        return path
    if path.suffix not in (".yaml", ".yml") and len(path.parts) == 1:
        for d in recipe_dirs():
            if _exists(d / f"{path.name}.yaml"):
                return d / f"{path.name}.yaml"
    known = ", ".join(n for n, _, _ in list_recipes()) or "none found"
    name = _printable(str(name_or_path))
    raise RecipeError(_one_line(f"{name}: no such recipe file or name (known recipes: {known})"))


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except (OSError, ValueError):  # a name too long for the file system, or one with a NUL byte
        return False


def load_recipe(source: str | Path | Mapping[str, Any] | Recipe, overrides: Sequence[str] = ()) -> Recipe:
    """Load, override and validate a recipe: a path, a recipe name from `prefixcap recipes`, a dict, or a Recipe.

    Every component is resolved in the registry and its options validated by its own model; all problems are
    reported together in one RecipeError whose lines read ``file:line: path: message``.
    """
    if isinstance(source, Recipe):
        source = source.to_dict()
    lines: dict[Loc, int] = {}
    if isinstance(source, Mapping):
        name, data = "<dict>", _plain(source)
    else:
        path = find_recipe(source)
        name = str(source)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise RecipeError(_one_line(f"{name}: cannot read recipe: {e}")) from None
        data, lines = _parse_yaml(text, name)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(
            f"{name}: a recipe is a mapping of sections ({', '.join(Recipe.model_fields)}), "
            f"got {type(data).__name__}"
        )
    overridden: set[Loc] = set()
    for assignment in overrides:
        overridden.add(apply_override(data, assignment))

    def where(loc: Loc) -> str:
        return _location(name, lines, overridden, loc)

    # Components and sections are checked independently so one run reports every problem, in file order.
    problems: list[str] = []
    options: dict[Loc, ComponentOptions] = {}
    for loc, kind, spec in _raw_components(data):
        try:
            registration = get_component(kind, spec["name"])
        except PluginError as e:  # unknown name (with suggestions), or a name two plugins clash on
            message = str(e)
            if isinstance(e, UnknownComponentError):  # the name as written may be long or hold control characters
                message = message.replace(repr(e.name), _short(e.name), 1)
            problems.append(f"{where(loc + ('name',))}: {_dotted(loc + ('name',))}: {message}")
            continue
        try:
            options[loc] = registration.parse_options({k: v for k, v in spec.items() if k != "name"})
        except ValidationError as e:
            problems += _format(e, loc, where, registration.options)
        except Exception as e:  # a plugin's own validator may raise anything; it is still this recipe's problem
            problems.append(f"{where(loc)}: {_dotted(loc)}: options rejected by {registration.provider}: {summary(e)}")
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        problems += _format(e, (), where, Recipe)
    if problems:
        line = re.compile(r"^[^\n]*?:(\d+): ")
        problems.sort(key=lambda p: int(m.group(1)) if (m := line.match(p)) else 1 << 30)
        raise RecipeError("\n".join(dict.fromkeys(_one_line(p) for p in problems)))
    recipe._source, recipe._lines, recipe._overridden = name, lines, overridden
    for loc, _, spec in recipe.components():
        spec._options = options[loc]
    return recipe


def _raw_components(data: dict[str, Any]) -> list[tuple[Loc, str, dict[str, Any]]]:
    """Component sections of a raw recipe dict that have a usable name; malformed ones are left to pydantic."""
    found: list[tuple[Loc, str, Any]] = [((slot,), kind, data.get(slot)) for slot, kind in SLOTS.items()]
    losses = data.get("losses", [{"name": "caption-ce"}])
    if isinstance(losses, list):
        found += [(("losses", i), "loss", spec) for i, spec in enumerate(losses)]
    if "system" not in data:
        found[0] = (("system",), "system", "prefix")
    out = []
    for loc, kind, spec in found:
        spec = {"name": spec} if isinstance(spec, str) else spec
        if isinstance(spec, dict) and isinstance(spec.get("name"), str) and spec["name"]:
            out.append((loc, kind, spec))
    return out


def _location(source: str, lines: dict[Loc, int], overridden: set[Loc], loc: Loc) -> str:
    for n in range(len(loc), -1, -1):
        sub = loc[:n]
        if sub in overridden:
            return f"--set {_dotted(sub)}"
        if sub in lines:
            return f"{source}:{lines[sub]}"
        created = sorted(_dotted(o) for o in overridden if n and o[:n] == sub)
        if created:  # a key that only an override brought into being
            return f"--set {created[0]}"
    return source


def _plain(data: Any, loc: Loc = (), count: list[int] | None = None) -> Any:
    """Deep-copy a mapping into plain dicts/lists so overrides never touch the caller's object; as for YAML text,
    a structure that nests too deeply, refers to itself or expands past the node limit is refused, and so is an
    integer too long to write as text (YAML and --set never give one: PyYAML and pydantic refuse to read it)."""
    count = [0] if count is None else count
    count[0] += 1
    if count[0] > _MAX_YAML_NODES:
        raise _TooBig(f"<dict>: recipe is too large or expands without bound (over {_MAX_YAML_NODES} values)")
    if len(loc) > _MAX_DEPTH:
        raise _TooBig(f"<dict>: recipe nests deeper than {_MAX_DEPTH} levels, or refers to itself")
    if isinstance(data, int) and not -_INT_LIMIT < data < _INT_LIMIT:
        # accepted, it would fail later with a bare ValueError when the run writes recipe.resolved.yaml
        raise RecipeError(_one_line(f"<dict>: {_dotted(loc) or '(top level)'}: an integer of more than "
                                    f"{_MAX_INT_DIGITS} digits, too long to write out"))  # fmt: skip
    if isinstance(data, ComponentSpec):
        data = data.model_dump()
    if isinstance(data, Mapping):
        return {k: _plain(v, loc + (k,), count) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [_plain(v, loc + (i,), count) for i, v in enumerate(data)]
    return data


def _format(e: ValidationError, prefix: Loc, where, root: type[BaseModel]) -> list[str]:
    out = []
    for err in e.errors(include_url=False):
        rel: Loc = tuple(err["loc"])
        loc = prefix + rel
        dotted = _dotted(loc) or "(top level)"
        if err["type"] == "extra_forbidden":
            parent = _model_at(root, rel[:-1])
            allowed = sorted(parent.model_fields) if parent else []
            what = "section" if parent is Recipe else "option"
            msg = f"unknown {what} {_short(loc[-1])}" + (f" (expected one of: {', '.join(allowed)})" if allowed else "")
        elif err["type"] == "missing":
            msg = "required but missing"
        else:
            msg = f"{_short(str(err['msg']), 200, quote=False)}; got {_short(err.get('input'))}"
        out.append(f"{where(loc)}: {dotted}: {msg}")
    return out


def _model_at(model: type[BaseModel], loc: Loc) -> type[BaseModel] | None:
    """The pydantic model found at ``loc`` under ``model``, to list the keys it allows."""
    for part in loc:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            return None
        candidates = [a for a in (field.annotation, *get_args(field.annotation)) if isinstance(a, type)]
        models = [a for a in candidates if issubclass(a, BaseModel)]
        if not models:
            return None
        model = models[0]
    return model


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 200  # cut before repr() sees all of a long value (or an expanded alias bomb)


def _short(value: Any, limit: int = 60, quote: bool = True) -> str:
    """``value`` for an error message: its repr (or, ``quote=False``, a string as is), on one line, at most
    ``limit`` characters, and cheap whatever its size."""
    if quote or not isinstance(value, str):
        try:
            value = _REPR.repr(value)
        except Exception:  # e.g. an int too long to print, or an object whose __repr__ fails
            value = f"<{type(value).__name__}>"
    text = _printable(value[: limit * 4])
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _printable(text: str) -> str:
    """Control characters, line breaks and lone surrogates escaped (\\x1b, \\n, \\ud800): safe on any terminal."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def _dotted(loc: Loc) -> str:
    """A recipe location as dotted keys, each one shortened and printable."""
    return ".".join(_short(part if isinstance(part, (str, int)) else _short(part), 60, quote=False) for part in loc)


def _one_line(text: str) -> str:
    """One line of an error message: printable, and at most _MAX_LINE characters."""
    return _short(text, _MAX_LINE, quote=False)
