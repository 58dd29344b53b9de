"""The one place systems are assembled: recipe (or names, dicts, objects) -> registry -> System.

The CLI, the Python API, bench and the tests all build through ``compose``; ``validate`` is compose without
weights, on the meta device, so a 200M-parameter recipe is checked in seconds with nothing downloaded.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from prefixcap.errors import CompositionError, PrefixcapError, summary
from prefixcap.recipe import ComponentSpec, Loc, Recipe, load_recipe
from prefixcap.registry import built_spec, get_component, with_spec

ComponentArg = str | Mapping[str, Any] | ComponentSpec | Any  # a name, a spec, or an already built module
Weights = Literal["pretrained", "random", "none"]


@dataclass
class ComponentReport:
    slot: str
    kind: str
    name: str
    checkpoint: str | None
    total: int
    trainable: int
    architecture: str = ""  # the model class it is made of (Component.architecture), e.g. "LlamaForCausalLM"


@dataclass
class ValidationReport:
    recipe: Recipe
    system: str
    components: list[ComponentReport]
    total: int
    trainable: int
    prefix_tokens: int | None
    lora_targets: list[str] = field(default_factory=list)


def compose(
    recipe: str | Path | Mapping[str, Any] | Recipe | None = None,
    *,
    system: ComponentArg | None = None,
    encoder: ComponentArg | None = None,
    connector: ComponentArg | None = None,
    decoder: ComponentArg | None = None,
    losses: Sequence[ComponentArg] | None = None,
    overrides: Sequence[str] = (),
    pretrained: bool | None = None,
    weights: Weights | None = None,
):
    """Build a System from a recipe and/or components given by name, by spec dict, or as built objects.

    ``compose(encoder={"name": "siglip", "checkpoint": "tiny"}, connector="mlp", decoder=my_decoder)``
    Keyword components replace the recipe's sections. ``weights``: ``"pretrained"`` (default) loads the
    checkpoints; ``"none"`` builds the architecture only, on the meta device (no weights, no memory), which is what
    `prefixcap validate` does; ``"random"`` builds the same architecture with randomly initialised weights in real
    memory (cost measurements at real sizes with nothing downloaded). Components built from configs alone have no
    tokenizer unless their checkpoint is ``tiny``. ``pretrained=True/False`` is the older spelling of
    ``"pretrained"``/``"none"``.
    """
    import torch
    from torch import nn

    if pretrained is not None and weights is not None:
        raise TypeError("compose() takes weights= or pretrained=, not both")
    if weights is None:
        weights = "none" if pretrained is False else "pretrained"
    elif weights not in ("pretrained", "random", "none"):
        raise ValueError(f"weights must be 'pretrained', 'random' or 'none', not {weights!r}")
    pretrained = weights == "pretrained"

    given = {"system": system, "encoder": encoder, "connector": connector, "decoder": decoder}
    objects: dict[str, Any] = {k: v for k, v in given.items() if isinstance(v, nn.Module)}
    loss_objects = list(losses) if losses is not None and all(isinstance(x, nn.Module) for x in losses) else None

    base = load_recipe(recipe if recipe is not None else {}, overrides)  # a Recipe and no overrides: itself
    specs = {k: v for k, v in given.items() if v is not None and k not in objects}
    if specs or objects or (losses is not None and loss_objects is None):
        data = base.to_dict()
        data.update({k: v.model_dump() if isinstance(v, ComponentSpec) else v for k, v in specs.items()})
        for slot, part in objects.items():
            # A part built by create() or compose() carries its section, so the recipe (and a save, and a load of
            # it) names it; one built by hand leaves its section out, and saving such a system says why it cannot.
            data[slot] = built_spec(part)
            if data[slot] is None:
                data.pop(slot)
        if losses is not None and loss_objects is None:
            data["losses"] = [x.model_dump() if isinstance(x, ComponentSpec) else x for x in losses]
        elif loss_objects is not None:
            loss_specs = [built_spec(x) for x in loss_objects]
            data["losses"] = loss_specs if None not in loss_specs else []
        base = load_recipe(data, origin=base)  # errors in the sections kept still name their file line
    recipe_ = base

    def build(loc: Loc, kind: str, spec: ComponentSpec | None, **wiring: Any) -> Any:
        if spec is None:
            return None
        registration = get_component(kind, spec.name)
        factory = registration.load_factory()
        where = f"{_named(recipe_.location(loc))}{'.'.join(map(str, loc))} {spec.name!r}"
        third_party = registration.provider.dist != "prefixcap"
        if third_party:  # its error is the plugin's to fix: say whose
            where += f" (from {registration.provider})"
        try:
            return with_spec(factory(spec.options, **wiring), spec.name, spec.options)
        except (PrefixcapError, OSError, ValueError) as e:
            raise CompositionError(f"{where}: {e}") from e
        except (RuntimeError, TypeError, OverflowError, MemoryError) as e:  # torch refusing sizes it cannot allocate
            raise CompositionError(f"{where} cannot be built with these options (are the sizes right?): "
                                   f"{summary(e)}") from e
        except Exception as e:  # a plugin's bug (KeyError, AttributeError, ...): a builtin's stays a traceback
            if not third_party:
                raise
            raise CompositionError(f"{where} failed to build: {type(e).__name__}: {summary(e)}; report it to the "
                                   f"authors of {registration.provider.dist} (PREFIXCAP_DEBUG=1 shows where)") from e

    # A system takes the sections it uses; the prefix system needs all three, the cross-attention baseline
    # owns its models, so each system checks its own inputs.
    with torch.device("meta") if weights == "none" else nullcontext():
        enc = objects["encoder"] if "encoder" in objects else build(("encoder",), "encoder", recipe_.encoder,
                                                                    pretrained=pretrained)  # fmt: skip
        dec = objects["decoder"] if "decoder" in objects else build(("decoder",), "decoder", recipe_.decoder,
                                                                    pretrained=pretrained)  # fmt: skip
        con = objects.get("connector")
        if con is None and recipe_.connector is not None:
            if enc is None or dec is None:
                raise CompositionError(f"{_named(recipe_.source)}a connector needs both an encoder and a decoder "
                                       "section")  # fmt: skip
            con = build(("connector",), "connector", recipe_.connector, in_dim=enc.dim, out_dim=dec.hidden_size,
                        in_tokens=enc.num_tokens)  # fmt: skip
        if con is not None and enc is not None and dec is not None:
            _check_dims(enc, con, dec)
        if "system" in objects:
            raise CompositionError("system must be given by name or spec; it is what compose() builds")

        def losses(hidden: int | None) -> list[Any]:
            return loss_objects if loss_objects is not None else [
                build(("losses", i), "loss", spec, hidden_size=hidden, pretrained=pretrained)
                for i, spec in enumerate(recipe_.losses)
            ]  # fmt: skip

        if dec is not None:
            built = build(("system",), "system", recipe_.system, encoder=enc, connector=con, decoder=dec,
                          losses=losses(dec.hidden_size), pretrained=pretrained)  # fmt: skip
        else:  # a system that owns its decoder (crossattn): its width is known once it is built
            built = build(("system",), "system", recipe_.system, encoder=enc, connector=con, decoder=dec,
                          losses=[], pretrained=pretrained)  # fmt: skip
            built.losses = nn.ModuleList(losses(getattr(built.decoder, "hidden_size", None)))
        built.check_embedding_loss()  # refused now, not at the first training step
        _apply_image_section(built, recipe_)
    if weights == "random":
        # Random weights cannot be fetched again, so saving keeps them whole (as for `checkpoint: tiny`).
        given_ids = {id(m) for m in [*objects.values(), *(loss_objects or [])]}
        for _, part in built.parts():
            if id(part) not in given_ids:
                part.random_init = True
    built.recipe = recipe_
    built.generate_config = recipe_.generate
    # Ready to caption, as loaded systems are: dropout (the mlp connector's, LoRA's) would otherwise make two calls of
    # caption() differ. Training switches it to train mode itself.
    return built.eval()


def _named(location: str) -> str:
    """``location: `` to start a message with; nothing for a recipe given as a dict, which has no file or line."""
    return "" if location == "<dict>" else f"{location}: "


def _apply_image_section(system: Any, recipe: Recipe) -> None:
    """The recipe's ``image`` section (resize mode, letterbox fill) onto the system's encoder, whoever wrote either:
    it goes through the Encoder base class (Encoder.set_preprocessing), so no encoder needs to know of it. Set every
    time, the defaults too: an encoder given to compose() as an object gets what this recipe says, nothing older."""
    image = recipe.image
    encoder = getattr(system, "encoder", None)
    if not hasattr(encoder, "set_preprocessing"):
        if image.resize is not None:
            raise CompositionError(f"{_named(recipe.location(('image',)))}image: the {recipe.system.name} system has "
                                   "no encoder (System.encoder) whose resizing it could set")  # fmt: skip
        return
    try:
        encoder.set_preprocessing(image.resize, image.fill)
    except ValueError as e:
        raise CompositionError(f"{_named(recipe.location(('image',)))}image: {e}") from e


def _check_dims(encoder: Any, connector: Any, decoder: Any) -> None:
    if connector.in_dim != encoder.dim:
        raise CompositionError(f"connector takes D={connector.in_dim} but the encoder gives D={encoder.dim}")
    if connector.out_dim != decoder.hidden_size:
        raise CompositionError(
            f"connector outputs H={connector.out_dim} but the decoder's hidden size is {decoder.hidden_size}"
        )


def validate(recipe: str | Path | Mapping[str, Any] | Recipe, overrides: Sequence[str] = ()) -> ValidationReport:
    """Dry run: resolve every component, build the architecture without weights, check it fits, count parameters."""
    system = compose(recipe, overrides=overrides, weights="none")
    r = system.recipe
    specs = {".".join(map(str, loc)): (kind, spec) for loc, kind, spec in r.components()}
    parts = []
    for slot, module in system.parts():  # what was built: a system may own parts the recipe does not name
        kind, spec = specs.get(slot, (slot.split(".")[0], r.system))
        checkpoint = getattr(spec.options, "checkpoint", None) if slot in specs else getattr(module, "checkpoint", None)
        total = sum(p.numel() for p in module.parameters())
        trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
        parts.append(ComponentReport(slot, kind, spec.name, checkpoint, total, trainable, module.architecture))
    total, trainable = system.parameter_counts()
    decoder = getattr(system, "decoder", None)
    return ValidationReport(
        recipe=r, system=r.system.name, components=parts, total=total, trainable=trainable,
        prefix_tokens=getattr(system, "num_prefix_tokens", None),
        lora_targets=list(getattr(decoder, "lora_targets", [])),
    )  # fmt: skip
