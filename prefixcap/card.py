"""Model cards: the README.md the model hub shows for a saved system or an export, with its YAML metadata.

    card = system_card(final_dir, manifest, metrics, name="quickstart")    # what persist.save_system writes

The metadata (huggingface_hub's ModelCardData, so the hub parses it as it parses its own) says what the model is
(library_name prefixcap, pipeline_tag image-to-text), what it derives from (base_model: the hub ids among its
checkpoints), what it was trained on (datasets: a hub dataset the recipe names) and how it scored (model-index: one
entry per test_/val_ metric of the run's metrics.json). The prose says how it was trained, what it is for, its
limits, and how to load it. Everything comes from the manifest and the metrics, so a card can be written wherever
they are: in final/ at the end of a run, in an export, or at `prefixcap push` for a system saved without one.

No license is set: the trained weights derive from the base checkpoints, whose licenses the card cannot know. The
card says so, and `prefixcap push --license` (or editing the YAML) sets one.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from prefixcap import checkpoints

CARD = "README.md"
# What the usage examples call the model until it has a hub id: `prefixcap push` writes the repository's id there.
PLACEHOLDER = "<user>/<repo>"
# An image goes in and text comes out; the prompt is fixed by the recipe, not the user's. The hub's
# image-text-to-text is for models that answer a user's text prompt about an image (its widget sends one).
PIPELINE_TAG = "image-to-text"
SPLITS = {"test": "test", "val": "validation"}  # metrics.json key prefixes -> the split names datasets uses


def hub_id(checkpoint: str) -> str | None:
    """The model hub id that a recipe's checkpoint string names, or None: ``tiny``, a model bundled with prefixcap,
    a local path, or a library's own tag (open_clip's ``openai``) are no hub model."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    name = checkpoint.removeprefix("hf-hub:")  # timm's and open_clip's spelling of a hub id
    if checkpoint in (checkpoints.TINY, *checkpoints.BUNDLED) or "/" not in name or Path(checkpoint).exists():
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def describe_checkpoint(checkpoint: str) -> str:
    """Where a checkpoint comes from, in words, without the training machine's directories."""
    if checkpoint == checkpoints.TINY:
        return "a small randomly initialised model (`tiny`)"
    if checkpoint in checkpoints.BUNDLED:
        return f"`{checkpoint}`, bundled with prefixcap"
    if (hub := hub_id(checkpoint)) is not None:
        return f"[{hub}](https://huggingface.co/{hub})"
    if Path(checkpoint).exists() or Path(checkpoint).is_absolute():
        return f"a local checkpoint (`{Path(checkpoint).name}`), not on the hub"
    return f"`{checkpoint}`"


def base_checkpoints(recipe: dict[str, Any]) -> list[tuple[str, str]]:
    """(part, checkpoint) of every pretrained model the recipe builds on: the components' ``checkpoint`` options,
    and a system that owns its models names them as its ``encoder`` and ``decoder`` options (crossattn)."""
    found = []
    for slot in ("system", "encoder", "connector", "decoder"):
        section = recipe.get(slot)
        if not isinstance(section, dict):
            continue
        for key in ("checkpoint", "encoder", "decoder") if slot == "system" else ("checkpoint",):
            value = section.get(key)
            if isinstance(value, str) and value:
                found.append((slot if key == "checkpoint" else key, value))
    return found


def hub_dataset(data: dict[str, Any]) -> str | None:
    """The hub dataset id a recipe's data section reads (its ``path`` option), if it names one."""
    path = data.get("path")
    return hub_id(path) if isinstance(path, str) else None


def eval_results(metrics: dict[str, Any], data: dict[str, Any]) -> list[Any]:
    """model-index entries (huggingface_hub EvalResult) for every finite test_ and val_ metric of metrics.json."""
    from huggingface_hub import EvalResult

    dataset = hub_dataset(data)
    name = str(data.get("name", "unknown"))
    results = []
    for key, value in metrics.items():
        prefix, _, metric = key.partition("_")
        if prefix not in SPLITS or not metric or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if not math.isfinite(value):  # NaN or inf: no value a reader could compare
            continue
        results.append(EvalResult(task_type=PIPELINE_TAG, task_name="Image captioning", dataset_type=dataset or name,
                                  dataset_name=dataset or name, dataset_split=SPLITS[prefix], metric_type=metric,
                                  metric_name=key, metric_value=_plain(value),
                                  dataset_config=data.get("config") if dataset else None,
                                  dataset_revision=data.get("revision") if dataset else None))  # fmt: skip
    return results


def _plain(value: int | float) -> int | float:
    """A builtin number: YAML cannot write numpy's float64, a float subclass that metrics can come as."""
    return float(value) if isinstance(value, float) else int(value)


def stored_parameters(directory: Path, manifest: dict[str, Any]) -> int:
    """How many numbers the saved system's own safetensors files hold (read from their headers, not loaded)."""
    from safetensors import safe_open

    total = 0
    for slot, names in manifest.get("files", {}).items():
        for name in names:
            if name.endswith(".safetensors"):
                with safe_open(Path(directory) / slot / name, framework="np") as f:
                    total += sum(math.prod(f.get_slice(key).get_shape()) for key in f.keys())
    return total


def run_metrics(saved: Path) -> dict[str, Any] | None:
    """The metrics.json of the run whose final/ ``saved`` is, if there is one to read."""
    path = Path(saved).parent / "metrics.json"
    if Path(saved).name != "final" or not path.is_file():
        return None
    try:
        metrics = json.loads(path.read_text())
    except (OSError, ValueError):  # the card is a description: an unreadable metrics file leaves its numbers out
        return None
    return metrics if isinstance(metrics, dict) else None


def card_name(directory: Path) -> str:
    """What a card calls the model: its run's name for a run's final/, its repository's for a snapshot in the hub's
    cache (models--user--repo/snapshots/<commit>), else the folder's own name."""
    directory = Path(directory).absolute()
    if directory.parent.name == "snapshots" and directory.parent.parent.name.startswith("models--"):
        return directory.parent.parent.name.split("--")[-1]
    return directory.parent.name if directory.name == "final" else directory.name


def _dataset_line(data: dict[str, Any]) -> str:
    if not data.get("name"):
        return "not recorded (the recipe it was saved with has no data section)"
    name = str(data["name"])
    if (dataset := hub_dataset(data)) is not None:
        return f"the hub dataset [{dataset}](https://huggingface.co/datasets/{dataset}) (data component `{name}`)"
    from prefixcap.errors import PluginError

    try:
        from prefixcap.registry import get_component

        description = get_component("dataset", name).description
    except PluginError:  # a plugin's data set that is not installed here: its name is all there is
        description = ""
    return f"`{name}`" + (f" ({description})" if description else "")


def _number(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else f"{value:,}" if isinstance(value, int) else str(value)


def system_card(directory: Path, manifest: dict[str, Any], metrics: dict[str, Any] | None = None, *, name: str,
                export: dict[str, Any] | None = None) -> str:  # fmt: skip
    """The README.md of the saved system in ``directory`` (its ``manifest``), trained with ``metrics`` (a run's
    metrics.json, or None); with ``export`` (an export's manifest), the card of that ONNX export of it."""
    from huggingface_hub import ModelCardData

    recipe = manifest.get("recipe") or {}
    data = recipe.get("data") or {}
    metrics = metrics or {}
    bases = base_checkpoints(recipe)
    base_ids = list(dict.fromkeys(h for _, c in bases if (h := hub_id(c)) is not None))
    dataset = hub_dataset(data)
    results = eval_results(metrics, data)
    system = str(manifest.get("system", "?"))
    tags = ["prefixcap", "image-captioning", "alt-text", f"prefixcap-{system}"] + (["onnx"] if export else [])
    meta = ModelCardData(library_name="prefixcap", pipeline_tag=PIPELINE_TAG, language="en", tags=tags,
                         base_model=base_ids or None, datasets=[dataset] if dataset else None,
                         model_name=name if results else None, eval_results=results or None)  # fmt: skip

    lines = [f"# {name}", ""]
    what = "An ONNX export of an image captioner" if export else "An image captioner"
    lines += [f"{what} that writes alt text: a short, plain description of a picture for people who cannot see "
              f"it. A prefixcap `{system}` system, trained with prefixcap {_prefixcap_version(manifest)}.", ""]

    lines += ["## Model", "", "| part | component | provided by | weights from |", "|---|---|---|---|"]
    checkpoint_of = dict(bases)
    for slot, part in (manifest.get("components") or {}).items():
        if not isinstance(part, dict) or part.get("kind") in ("loss", "dataset"):  # no weights of their own
            continue
        source = checkpoint_of.get(slot)
        weights = describe_checkpoint(source) if source else "" if slot == "system" else "initialised at random"
        lines.append(f"| {slot} | `{part.get('name')}` | {part.get('distribution')} {part.get('version')} | "
                     f"{weights} |")
    for role in ("encoder", "decoder"):  # a system that owns its models (crossattn) names them itself
        if role in checkpoint_of and role not in (manifest.get("components") or {}):
            lines.append(f"| {role} | (the system's) | | {describe_checkpoint(checkpoint_of[role])} |")
    lines.append("")
    if not export:
        stored = stored_parameters(directory, manifest)
        whole = (", and the whole VisionEncoderDecoderModel, frozen encoder included, so that it loads with plain "
                 "transformers") if system == "crossattn" else ""
        lines += [f"Its safetensors files hold {stored:,} parameters: what training changed (for a LoRA decoder, "
                  f"only the adapter), any part initialised at random{whole}. Weights not stored here are the base "
                  "checkpoints', fetched from where the table says when the system is loaded.", ""]
    else:
        graphs = ", ".join(f"`{g.get('file')}`" for g in (export.get("graphs") or {}).values())
        lines += [f"The graphs ({graphs}, with int8 versions where exported) run with onnxruntime alone, no torch; "
                  "LoRA is merged into the decoder. manifest.json describes every input and output.", ""]

    train = recipe.get("train") or {}
    lines += ["## Training", "",
              f"- data: {_dataset_line(data)}",
              f"- the recipe's train section: {train.get('steps', '?')} steps of batch {train.get('batch_size', '?')} "
              f"(x{train.get('grad_accum', 1)} accumulated), learning rate {train.get('lr', '?')}, "
              f"{train.get('precision', '?')}, seed {train.get('seed', '?')}"]
    if "steps" in metrics:
        lines.append(f"- trained {_number(metrics['steps'])} steps on {_number(metrics.get('train_examples', '?'))} "
                     f"examples; best validation step {_number(metrics.get('best_step'))}")
    lines += ["- the full resolved recipe, with every default spelled out, is in `manifest.json`"
              + (" of the saved system this was exported from" if export else ""), ""]

    if metrics:
        lines += ["## Evaluation", "", "From the run's metrics.json (test_: held-out test split; val_: validation; "
                  "best_val_: the best validation value during training).", "", "| metric | value |", "|---|---|"]
        lines += [f"| {key} | {_number(value)} |" for key, value in metrics.items()]
        lines.append("")

    lines += ["## Intended use", "",
              "Drafting alt text for images like the ones it was trained on, for a person to review before it is "
              "published. Captions follow the recipe's `generate` section (greedy by default) and are tidied into "
              "alt text by `prefixcap caption` (no leading \"an image of\", a capital first, a full stop, at most "
              "125 characters).", "",
              "## Limitations", "",
              "- It knows only what its training data" + (f" (`{data['name']}`)" if data.get("name") else "")
              + " shows; on other kinds of image its captions can be confidently wrong.",
              "- It writes English only (the language of its training captions, as far as prefixcap knows: correct "
              "`language` in the metadata if yours were not English).",
              "- No safety filtering: nothing stops a caption from being offensive, from guessing a person's "
              "identity, gender or age, or from missing what matters in a picture. It does not read text in images "
              "reliably.",
              "- Caption metrics miss much of what makes alt text useful: try it on your own images before relying "
              "on it.", ""]

    plugins = sorted({str(p.get("distribution")) for p in (manifest.get("components") or {}).values()
                      if isinstance(p, dict) and p.get("distribution") not in (None, "prefixcap")})  # fmt: skip
    lines += ["## How to use", ""]
    if plugins:
        lines += [f"It needs these prefixcap plugins besides prefixcap: {', '.join(plugins)}.", ""]
    if export:
        lines += ["```bash", f"hf download {PLACEHOLDER} --local-dir model   # or the folder itself",
                  "prefixcap caption --onnx model photo.jpg", "```", ""]
    else:
        lines += ["```python", "import prefixcap", "from PIL import Image", "",
                  f'system = prefixcap.load("{PLACEHOLDER}")  # the hub id, or the folder\'s path',
                  'print(system.caption([Image.open("photo.jpg")]))', "```", "", "```bash",
                  f"prefixcap caption {PLACEHOLDER} photo.jpg another.png folder/", f"prefixcap export {PLACEHOLDER} "
                  "--out onnx --int8   # onnxruntime only, or --web for a captioning page", "```", "",
                  "Only safetensors and JSON are read; a pickle is never loaded.", ""]

    lines += ["## License", "",
              "Not set by prefixcap: these weights derive from the base checkpoints above, whose licenses apply. Set "
              "`license:` in the metadata above (or `prefixcap push --license ID`) before you publish.", ""]
    return f"---\n{meta.to_yaml()}\n---\n\n" + "\n".join(lines)


def _prefixcap_version(manifest: dict[str, Any]) -> str:
    return str((manifest.get("versions") or {}).get("prefixcap", "")).strip() or "(unknown version)"


def write_card(directory: Path, text: str) -> Path:
    """Write ``text`` as ``directory``/README.md (directories being built in a temporary place: no atomic write)."""
    path = Path(directory) / CARD
    path.write_text(text, encoding="utf-8")
    return path


def parse_card(text: str) -> Any:
    """The card as huggingface_hub reads it (ModelCard), e.g. to set its license."""
    from huggingface_hub import ModelCard

    return ModelCard(text)
