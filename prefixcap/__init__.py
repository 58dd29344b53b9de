"""prefixcap: train, compare and ship small image-captioning models for alt text.

    import prefixcap
    prefixcap.list_components("decoder")                       # what is registered (builtins + plugins)
    recipe = prefixcap.load_recipe("quickstart", ["train.lr=3e-4"])
    system = prefixcap.compose(recipe)                         # or compose(encoder=..., connector=..., decoder=...)
    system.caption(images)

Importing prefixcap does not import torch; building a system does.
"""

from prefixcap.compose import compose, validate
from prefixcap.errors import (CompositionError, PluginError, PrefixcapError, RecipeError, SavedSystemError,
                              UnknownComponentError)
from prefixcap.hookspecs import hookimpl
from prefixcap.recipe import Recipe, list_recipes, load_recipe
from prefixcap.registry import CheckpointOptions, ComponentOptions, create, get_component, list_components

__version__ = "0.1.0"


def load(directory, device=None, *, trust_remote_code: bool = False):
    """Load a system saved with ``system.save(directory)`` (or a run's final/ directory), or pushed to the model hub
    ("user/repo": downloaded, or read from the hub's cache; a local directory of that name wins). A saved system whose
    recipe sets trust_remote_code is refused unless ``trust_remote_code=True``: loading a file must not run a hub's
    code."""
    from prefixcap.hub import resolve
    from prefixcap.persist import load_system

    return load_system(resolve(directory), device, trust_remote_code=trust_remote_code)


__all__ = [
    "CheckpointOptions", "ComponentOptions", "CompositionError", "PluginError", "PrefixcapError", "Recipe",
    "RecipeError", "SavedSystemError", "UnknownComponentError", "compose", "create", "get_component", "hookimpl",
    "list_components", "list_recipes", "load", "load_recipe", "validate",
]  # fmt: skip
