"""Recipes: YAML (or dicts) validated by pydantic, with errors that point at the YAML line.

A recipe has the sections ``system, encoder, connector, decoder, losses, data, train, eval, generate, output``.
Each component section is ``{name: ..., checkpoint: ..., **options}`` (or just the name); its options are
validated by the options model the component registered, so a plugin owns its own schema.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from prefixcap.errors import PluginError, RecipeError, first_line
from prefixcap.registry import ComponentOptions, get_component

Loc = tuple[str | int, ...]
_MAX_YAML_NODES = 100_000  # an alias bomb expands past this long before it costs memory


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class ComponentSpec(BaseModel):
    """``{name, **options}``: the options are checked against the component's own model by ``resolve``."""

    model_config = ConfigDict(extra="allow")

    name: str = Field(min_length=1)
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
    seed: int = 0
    # A frozen encoder's features are computed once, cached on disk, and reused by every epoch and run.
    cache_features: bool = True


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


def _parse_yaml(text: str, source: str) -> tuple[Any, dict[Loc, int]]:
    """Parse YAML safely; also return the 1-based line of every mapping key / sequence item."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        lines: dict[Loc, int] = {}
        if node is not None:
            _index_lines(node, (), lines, [0])
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{source}:{mark.line + 1}" if mark else source
        raise RecipeError(f"{where}: invalid YAML: {e.problem or e.context}") from None
    except yaml.YAMLError as e:
        raise RecipeError(f"{source}: invalid YAML: {e}") from None
    finally:
        loader.dispose()
    return data, lines


def _index_lines(node: yaml.Node, loc: Loc, lines: dict[Loc, int], count: list[int]) -> None:
    count[0] += 1
    if count[0] > _MAX_YAML_NODES:
        raise RecipeError(f"recipe is too large or expands without bound (over {_MAX_YAML_NODES} YAML nodes)")
    lines.setdefault(loc, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            child = loc + (str(key.value),)
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
    if not eq or not all(parts):
        raise RecipeError(f"--set {assignment!r}: expected KEY=VALUE with a dotted key, e.g. train.lr=3e-4")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    loc: Loc = tuple(int(p) if p.isdigit() else p for p in parts)
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
            raise RecipeError(f"--set {assignment!r}: {'.'.join(map(str, loc[: i + 1]))} is not a section")
    last = loc[-1]
    if isinstance(target, dict):
        target[last] = value
    elif isinstance(target, list) and isinstance(last, int) and last <= len(target):
        target[last:last + 1] = [value]
    else:
        raise RecipeError(f"--set {assignment!r}: {'.'.join(map(str, loc[:-1]))} is not a section")
    return loc


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
    if path.exists():
        return path
    if path.suffix not in (".yaml", ".yml") and len(path.parts) == 1:
        for d in recipe_dirs():
            if (d / f"{path.name}.yaml").exists():
                return d / f"{path.name}.yaml"
    known = ", ".join(n for n, _, _ in list_recipes()) or "none found"
    raise RecipeError(f"{name_or_path}: no such recipe file or name (known recipes: {known})")


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
            raise RecipeError(f"{name}: cannot read recipe: {e}") from None
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
            problems.append(f"{where(loc + ('name',))}: {'.'.join(map(str, loc))}.name: {e}")
            continue
        try:
            options[loc] = registration.parse_options({k: v for k, v in spec.items() if k != "name"})
        except ValidationError as e:
            problems += _format(e, loc, where, registration.options)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        problems += _format(e, (), where, Recipe)
    if problems:
        line = re.compile(r"^[^\n]*?:(\d+): ")
        problems.sort(key=lambda p: int(m.group(1)) if (m := line.match(p)) else 1 << 30)
        raise RecipeError("\n".join(dict.fromkeys(problems)))
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
            return f"--set {'.'.join(map(str, sub))}"
        if sub in lines:
            return f"{source}:{lines[sub]}"
        created = sorted(".".join(map(str, o)) for o in overridden if n and o[:n] == sub)
        if created:  # a key that only an override brought into being
            return f"--set {created[0]}"
    return source


def _plain(data: Any) -> Any:
    """Deep-copy a mapping into plain dicts/lists so overrides never touch the caller's object."""
    if isinstance(data, Mapping):
        return {k: _plain(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [_plain(v) for v in data]
    return data


def _format(e: ValidationError, prefix: Loc, where, root: type[BaseModel]) -> list[str]:
    out = []
    for err in e.errors(include_url=False):
        rel: Loc = tuple(err["loc"])
        loc = prefix + rel
        dotted = ".".join(map(str, loc)) or "(top level)"
        if err["type"] == "extra_forbidden":
            parent = _model_at(root, rel[:-1])
            allowed = sorted(parent.model_fields) if parent else []
            what = "section" if parent is Recipe else "option"
            msg = f"unknown {what} {loc[-1]!r}" + (f" (expected one of: {', '.join(allowed)})" if allowed else "")
        elif err["type"] == "missing":
            msg = "required but missing"
        else:
            msg = f"{err['msg']}; got {_short(err.get('input'))}"
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


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
