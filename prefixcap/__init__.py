"""prefixcap: train, compare and ship small image-captioning models for alt text.

    import prefixcap
    prefixcap.list_components("decoder")                       # what is registered (builtins + plugins)
    recipe = prefixcap.load_recipe("quickstart", ["train.lr=3e-4"])
    system = prefixcap.compose(recipe)                         # or compose(encoder=..., connector=..., decoder=...)
    result = prefixcap.train(system, data="shapes", run_dir="runs/mine", steps=300)   # `prefixcap run`, from Python
    system.caption(images)
    prefixcap.load("runs/mine")                                # what the run saved, in a new process

Importing prefixcap does not import torch; building a system does.
"""

import os as _os

# Before torch loads OpenMP, which reads this once. OpenMP's threads spin while they wait for each other; beside another
# busy process a spinning thread holds the core that the thread it waits for needs. On 2 cores the quickstart trained
# at 0.32x its speed alone beside one busy process and 0.16x beside a second run; waiting passively, 0.69x and 0.73x,
# for 9% less alone (benchmarks/threads.py). A choice the user made, either variable set, stands.
if "OMP_WAIT_POLICY" not in _os.environ and "GOMP_SPINCOUNT" not in _os.environ:
    _os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

from prefixcap.compose import compose, validate
from prefixcap.errors import (CompositionError, PluginError, PrefixcapError, RecipeError, SavedSystemError,
                              UnknownComponentError)
from prefixcap.hookspecs import hookimpl
from prefixcap.recipe import Recipe, list_recipes, load_recipe
from prefixcap.registry import CheckpointOptions, ComponentOptions, create, get_component, list_components

__version__ = "0.1.0"


def load(directory, device=None, *, trust_remote_code: bool = False):
    """Load a system saved with ``system.save(directory)``, a run directory (its final/), or a system pushed to the
    model hub ("user/repo": downloaded, or read from the hub's cache; a local directory of that name wins). A saved
    system whose recipe sets trust_remote_code is refused unless ``trust_remote_code=True``: loading a file must not
    run a hub's code."""
    from prefixcap.persist import load_system, saved_system_dir

    return load_system(saved_system_dir(directory), device, trust_remote_code=trust_remote_code)


def train(what, data=None, **options):
    """Train a recipe or a system composed in Python, evaluate it and save it under a run directory; see
    prefixcap.training.run.train for the options. Returns a RunResult (run_dir, metrics, steps, system)."""
    from prefixcap.training.run import train as train_run

    return train_run(what, data, **options)


__all__ = [
    "CheckpointOptions", "ComponentOptions", "CompositionError", "PluginError", "PrefixcapError", "Recipe",
    "RecipeError", "SavedSystemError", "UnknownComponentError", "compose", "create", "get_component", "hookimpl",
    "list_components", "list_recipes", "load", "load_recipe", "train", "validate",
]  # fmt: skip
