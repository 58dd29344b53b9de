"""Recipes: YAML (or dicts) validated by pydantic, with errors that point at the YAML line.

A recipe has the sections ``system, encoder, connector, decoder, losses, data, image, train, eval, generate,
output``. Each component section is ``{name: ..., **options}`` (or just the name); its options are validated by the
options model the component registered, so a plugin owns its own schema. The plain sections live in prefixcap.config, the
YAML parser and message helpers in prefixcap.yaml_text.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, get_args

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from prefixcap.config import (EvalConfig, GenerateConfig, ImageConfig, LanguageConfig, OutputConfig, Section,
                              TrainConfig)
from prefixcap.errors import PluginError, RecipeError, UnknownComponentError, first_line, summary
from prefixcap.registry import ComponentOptions, get_component
from prefixcap.yaml_text import MAX_DEPTH, MAX_YAML_NODES, Loc, TooBig, dotted, one_line, parse_yaml, printable, short

_MAX_INT_DIGITS = 4300  # Python's default int<->str limit: past it a number cannot be written out or read back
_INT_LIMIT = 10**_MAX_INT_DIGITS


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


SLOTS: dict[str, str] = {"system": "system", "encoder": "encoder", "connector": "connector", "decoder": "decoder",
                         "data": "dataset"}  # fmt: skip


class Recipe(Section):
    description: str = ""
    system: ComponentSpec = ComponentSpec(name="prefix")
    encoder: ComponentSpec | None = None
    connector: ComponentSpec | None = None
    decoder: ComponentSpec | None = None
    losses: list[ComponentSpec] = Field(default_factory=lambda: [ComponentSpec(name="caption-ce")])
    data: ComponentSpec | None = None
    image: ImageConfig = ImageConfig()  # how images are resized, for whichever encoder (compose applies it)
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    generate: GenerateConfig = GenerateConfig()
    output: OutputConfig = OutputConfig()
    # A language adapter run (prefixcap.languages): the trained system it starts from (a run directory or a saved
    # system), whose parts it keeps frozen, and the adapter it trains. The parts come from the base, not from here.
    base: str | None = Field(None, min_length=1)
    language: LanguageConfig | None = None

    @model_validator(mode="after")
    def _base_and_language_together(self) -> "Recipe":
        # language: with the parts and no base: is what a language run resolves to (its recipe.resolved.yaml)
        if self.base is not None and self.language is None or self.language is not None and self.decoder is None \
                and self.base is None:  # fmt: skip
            raise ValueError("base: and language: go together: a language adapter is trained on a trained system "
                             "(base: runs/quickstart, language: {name: de})")  # fmt: skip
        if self.base is not None:
            given = [s for s in (*SLOTS, "losses", "image") if s != "data" and s in self.model_fields_set]
            if given:
                raise ValueError(f"a recipe with base: takes its {', '.join(given)} from the base system; leave "
                                 f"{'it' if len(given) == 1 else 'them'} out")  # fmt: skip
        return self

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


# --- overrides -------------------------------------------------------------------------------------------------


def apply_override(data: dict[str, Any], assignment: str) -> Loc:
    """Apply ``a.b.c=value`` (value parsed as YAML) to a recipe dict in place; returns the location set."""
    key, eq, raw = assignment.partition("=")
    parts = [p.strip() for p in key.strip().split(".")]
    shown = short(assignment, 100)
    if not eq or not all(parts):
        raise RecipeError(one_line(f"--set {shown}: expected KEY=VALUE with a dotted key, e.g. train.lr=3e-4"))
    try:
        value = parse_yaml(raw, "--set")[0] if raw.strip() else ""
    except TooBig as e:  # an alias bomb or a deeply nested value is refused, not kept as a string
        raise RecipeError(one_line(f"--set {shown}: {str(e).removeprefix('--set: ')}")) from None
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
            raise RecipeError(one_line(f"--set {shown}: {_cannot_set(loc, i, target)}"))
    last = loc[-1]
    if isinstance(target, dict):
        target[last] = value
    elif isinstance(target, list) and isinstance(last, int) and last <= len(target):
        target[last:last + 1] = [value]
    else:
        raise RecipeError(one_line(f"--set {shown}: {_cannot_set(loc, len(loc) - 1, target)}"))
    return loc


def _cannot_set(loc: Loc, n: int, target: Any) -> str:
    """Why ``loc[n]`` cannot be set inside ``target``, the value at ``loc[:n]``."""
    if isinstance(target, list):
        if isinstance(loc[n], int):
            return f"{dotted(loc[: n + 1])} is past the end of {dotted(loc[:n])} ({len(target)} items)"
        return f"{dotted(loc[:n])} is a list: {short(loc[n])} is not an index"
    return f"{dotted(loc[:n])} is not a section (it holds {type(target).__name__} {short(target)})"


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
                data, _ = parse_yaml(path.read_text(encoding="utf-8"), str(path))
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
    name = printable(str(name_or_path))
    raise RecipeError(one_line(f"{name}: no such recipe file or name (known recipes: {known})"))


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except (OSError, ValueError):  # a name too long for the file system, or one with a NUL byte
        return False


def load_recipe(source: str | Path | Mapping[str, Any] | Recipe, overrides: Sequence[str] = (), *,
                origin: Recipe | None = None) -> Recipe:  # fmt: skip
    """Load, override and validate a recipe: a path, a recipe name from `prefixcap recipes`, a dict, or a Recipe.

    Every component is resolved in the registry and its options validated by its own model; all problems are
    reported together in one RecipeError whose lines read ``file:line: path: message``. A Recipe is returned as it
    is, or, with overrides, re-validated with them, still pointing at its own file lines and earlier overrides.
    ``origin``: the recipe a mapping ``source`` was derived from (e.g. its ``to_dict()`` with sections replaced); the
    result keeps origin's file name, and its lines and overrides for the top-level sections left as they were.
    """
    if isinstance(source, Recipe):
        if not overrides and origin is None and all(spec._options is not None for _, _, spec in source.components()):
            return source  # already validated and resolved
        source, origin = source.to_dict(), origin if origin is not None else source
    if origin is not None and not isinstance(source, Mapping):
        raise TypeError("load_recipe(origin=...) goes with a mapping derived from that recipe, not a file")
    lines: dict[Loc, int] = {}
    overridden: set[Loc] = set()
    if isinstance(source, Mapping):
        name, data = "<dict>", _plain(source)
        if origin is not None and isinstance(data, dict):
            name, lines, overridden = _inherited(origin, data)
    else:
        path = find_recipe(source)
        name = str(source)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise RecipeError(one_line(f"{name}: cannot read recipe: {e}")) from None
        data, lines = parse_yaml(text, name)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(
            f"{_at(name)}a recipe is a mapping of sections ({', '.join(Recipe.model_fields)}), "
            f"got {type(data).__name__}"
        )
    new = {apply_override(data, assignment) for assignment in overrides}
    if new:  # what an override replaced is no longer at its file line (`--set connector={name: mlp, hidden: 8}`)
        lines = {loc: n for loc, n in lines.items() if not any(len(loc) > len(o) and loc[: len(o)] == o for o in new)}
        overridden |= new

    def where(loc: Loc) -> str:  # ``file:line: `` to start a problem with
        return _at(_location(name, lines, overridden, loc))

    # Components and sections are checked independently so one run reports every problem, in file order.
    problems: list[str] = []
    options: dict[Loc, ComponentOptions] = {}
    for loc, kind, spec in _raw_components(data):
        try:
            registration = get_component(kind, spec["name"])
        except PluginError as e:  # unknown name (with suggestions), or a name two plugins clash on
            message = str(e)
            if isinstance(e, UnknownComponentError):  # the name as written may be long or hold control characters
                message = message.replace(repr(e.name), short(e.name), 1)
            problems.append(f"{where(loc + ('name',))}{dotted(loc + ('name',))}: {message}")
            continue
        try:
            options[loc] = registration.parse_options({k: v for k, v in spec.items() if k != "name"})
        except ValidationError as e:
            problems += _format(e, loc, where, registration.options)
        except Exception as e:  # a plugin's own validator may raise anything; it is still this recipe's problem
            problems.append(f"{where(loc)}{dotted(loc)}: options rejected by {registration.provider}: {summary(e)}")
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        problems += _format(e, (), where, Recipe)
    if problems:
        line = re.compile(r"^[^\n]*?:(\d+): ")
        problems.sort(key=lambda p: int(m.group(1)) if (m := line.match(p)) else 1 << 30)
        raise RecipeError("\n".join(dict.fromkeys(one_line(p) for p in problems)))
    recipe._source, recipe._lines, recipe._overridden = name, lines, overridden
    for loc, _, spec in recipe.components():
        spec._options = options[loc]
    return recipe


def _inherited(origin: Recipe, data: dict[str, Any]) -> tuple[str, dict[Loc, int], set[Loc]]:
    """origin's source name, and its line index and overrides minus those under a top-level section of ``data``
    that differs from origin's: that section came from the caller, so its errors name the file without a line."""
    before = origin.to_dict()
    changed = {k for k in {*before, *data} if not _same(before.get(k, _MISSING), data.get(k, _MISSING))}
    lines = {loc: n for loc, n in origin._lines.items() if loc and loc[0] not in changed}
    lines.update({(k,): 0 for k in changed if k in data})  # 0: in the recipe, at no line of the file
    if () in origin._lines and not changed:
        lines[()] = origin._lines[()]  # the document's own line only while the document is the file's
    return origin._source, lines, {loc for loc in origin._overridden if loc[0] not in changed}


_MISSING = object()


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception:  # a caller's value that cannot be compared (an array): treat it as new
        return False


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


def _at(location: str) -> str:
    """``location: `` to start a message with; nothing for a recipe given as a dict, which has no file or line."""
    return "" if location == "<dict>" else f"{location}: "


def _location(source: str, lines: dict[Loc, int], overridden: set[Loc], loc: Loc) -> str:
    for n in range(len(loc), -1, -1):
        sub = loc[:n]
        if sub in overridden:
            return f"--set {dotted(sub)}"
        if sub in lines:
            return f"{source}:{lines[sub]}" if lines[sub] else source
        created = sorted(dotted(o) for o in overridden if n and o[:n] == sub)
        if created:  # a key that only an override brought into being
            return f"--set {created[0]}"
    return source


def _plain(data: Any, loc: Loc = (), count: list[int] | None = None) -> Any:
    """Deep-copy a mapping into plain dicts/lists so overrides never touch the caller's object; as for YAML text,
    a structure that nests too deeply, refers to itself or expands past the node limit is refused, and so is an
    integer too long to write as text (YAML and --set never give one: PyYAML and pydantic refuse to read it)."""
    count = [0] if count is None else count
    count[0] += 1
    if count[0] > MAX_YAML_NODES:
        raise TooBig(f"recipe is too large or expands without bound (over {MAX_YAML_NODES} values)")
    if len(loc) > MAX_DEPTH:
        raise TooBig(f"recipe nests deeper than {MAX_DEPTH} levels, or refers to itself")
    if isinstance(data, int) and not -_INT_LIMIT < data < _INT_LIMIT:
        # accepted, it would fail later with a bare ValueError when the run writes recipe.resolved.yaml
        raise RecipeError(one_line(f"{dotted(loc) or '(top level)'}: an integer of more than "
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
        key = dotted(loc) or "(top level)"
        if err["type"] == "extra_forbidden":
            parent = _model_at(root, rel[:-1])
            allowed = sorted(parent.model_fields) if parent else []
            what = "section" if parent is Recipe else "option"
            msg = f"unknown {what} {short(loc[-1])}" + (f" (expected one of: {', '.join(allowed)})" if allowed else "")
        elif err["type"] == "missing":
            msg = "required but missing"
        else:
            msg = f"{short(str(err['msg']), 200, quote=False)}; got {short(err.get('input'))}"
        out.append(f"{where(loc)}{key}: {msg}")
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
