"""Saved systems on the Hugging Face model hub: a hub id wherever a saved system's path is taken, and publishing one.

    resolve("runs/quickstart")   the local directory: a path that exists always wins
    resolve("user/repo")         a snapshot of that model repository (huggingface_hub.snapshot_download: from the hub's
                                 cache when it holds one, HF_HUB_OFFLINE and HF_HUB_CACHE honoured as everywhere)
    plan = upload_plan("runs/quickstart", "user/repo")   the files `prefixcap push` would upload, and its README.md
    push(plan, private=True)     create_repo, then one commit of exactly plan.files

Downloads are limited to ALLOW_PATTERNS: safetensors, JSON, text and tokenizer files. A repository's pickles
(pytorch_model.bin, *.pt, *.pkl) are never fetched, and persist never reads one in any case.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefixcap.checkpoints import installed_versions, valid_repo_id
from prefixcap.errors import PrefixcapError, SavedSystemError, summary
from prefixcap.weights import PICKLE_WEIGHTS

# What a saved system (manifest, safetensors, adapter and tokenizer files) and its card are made of.
ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.md", "*.txt", "*.model", "*.jinja"]


class HubError(PrefixcapError):
    """The model hub could not be reached, or refused what was asked of it."""


def is_repo_id(text: str) -> bool:
    """Whether ``text`` can name a model repository: ``namespace/name`` as the hub spells ids. A bare name (gpt2) is
    a legacy id, but as a saved system's name it is far likelier a mistyped local folder."""
    return text.count("/") == 1 and valid_repo_id(text)


def resolve(source: str | Path) -> Path:
    """The directory ``source`` names: itself when it exists (or is no hub id), else the hub repository's snapshot."""
    if not isinstance(source, str) or Path(source).exists() or not is_repo_id(source):
        return Path(source)
    return download(source)


def _version() -> str:
    """prefixcap's version, for the hub's user agent (read from the installed metadata: prefixcap/__init__.py sits
    above this module)."""
    return installed_versions(("prefixcap",)).get("prefixcap", "unknown")


def _offline() -> bool:
    from huggingface_hub import constants

    return constants.is_offline_mode()


def download(repo_id: str) -> Path:
    """A snapshot of the model repository ``repo_id``, from the cache or the hub; SavedSystemError when neither has
    one, saying which (a path was asked for too: the message names both readings of ``repo_id``)."""
    import httpx2
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (HfHubHTTPError, IncompleteSnapshotError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)  # fmt: skip

    missing = f"{repo_id}: no such directory"
    cache = constants.HF_HUB_CACHE
    try:
        return Path(snapshot_download(repo_id, allow_patterns=ALLOW_PATTERNS, library_name="prefixcap",
                                      library_version=_version()))  # fmt: skip
    except IncompleteSnapshotError:
        raise SavedSystemError(f"{missing}, and its snapshot in the hub cache ({cache}) is incomplete while the hub "
                               "cannot be reached; download it again online") from None  # fmt: skip
    except LocalEntryNotFoundError as e:
        if _offline():
            raise SavedSystemError(f"{missing}, and the hub cache ({cache}) holds no snapshot of the model repository "
                                   f"{repo_id} while HF_HUB_OFFLINE is set; download it once online, or give a local "
                                   "directory") from None  # fmt: skip
        why = summary(e.__cause__) if e.__cause__ is not None else "no answer"
        raise SavedSystemError(f"{missing}, and the model hub ({constants.ENDPOINT}) cannot be reached ({why}) nor "
                               f"does its cache ({cache}) hold {repo_id}") from None  # fmt: skip
    except RevisionNotFoundError as e:
        raise SavedSystemError(f"{missing}, and the hub repository {repo_id} has no such revision ({summary(e)})"
                               ) from None  # fmt: skip
    except RepositoryNotFoundError:  # also a private or gated one that this token may not read
        raise SavedSystemError(f"{missing}, nor a model repository on the hub that you may read (a private one needs "
                               "`hf auth login` or HF_TOKEN)") from None  # fmt: skip
    except HfHubHTTPError as e:
        raise SavedSystemError(f"{missing}, and the hub refused to send {repo_id}: {summary(e)}") from None
    except (OSError, httpx2.HTTPError) as e:  # a full disk, a dropped connection mid-download
        raise SavedSystemError(f"{missing}, and downloading {repo_id} from the hub failed: {summary(e)}") from None


# --- publishing ---------------------------------------------------------------------------------------------------


@dataclass
class UploadPlan:
    """What `prefixcap push` uploads: ``files`` (paths in the repository, sorted) from ``folder``, README.md's text
    being ``card`` (None: the folder has no card and none can be written for it)."""

    folder: Path
    repo_id: str
    files: list[str]
    card: str | None
    card_origin: str  # "folder": the folder's README.md; "written": written now from manifest.json; "": none

    def sizes(self) -> dict[str, int]:
        return {name: len(self.card.encode()) if name == CARD_NAME and self.card is not None
                else (self.folder / name).stat().st_size for name in self.files}  # fmt: skip


CARD_NAME = "README.md"


def folder_files(folder: Path) -> list[str]:
    """Every file under ``folder`` as a repository path, sorted; names starting with "." (temporaries of an
    interrupted write, editor and OS files) left out. A pickle is refused: nothing prefixcap writes is one, and a
    stranger's copy of the model would load it."""
    found = []
    for root, dirs, names in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in names:
            path = Path(root) / name
            if name.startswith(".") or not path.is_file():
                continue
            relative = path.relative_to(folder).as_posix()
            if name.lower().endswith(PICKLE_WEIGHTS):
                raise HubError(f"{folder}: {relative} is a pickle-based file, which prefixcap never writes nor reads "
                               "(loading one can run code); remove it before pushing")  # fmt: skip
            found.append(relative)
    return sorted(found)


def upload_plan(source: str | Path, repo_id: str, *, license: str | None = None) -> UploadPlan:
    """What pushing ``source`` (a run directory: its final/; a saved system; an export) to ``repo_id`` uploads: its
    files, with the model card's usage examples naming ``repo_id`` (and its metadata ``license``, if given)."""
    from prefixcap.card import PLACEHOLDER, card_name, parse_card, run_metrics, system_card
    from prefixcap.persist import FORMAT, saved_system_dir

    if not is_repo_id(repo_id):
        raise HubError(f"{repo_id}: not a model hub repository id; expected namespace/name, e.g. alice/alt-text")
    if not Path(source).exists():  # a hub id here would push a download back: only local folders are pushed
        raise HubError(f"{source}: no such directory; expected a run directory, a saved system or an export")
    folder = saved_system_dir(source)
    manifest = _manifest(folder)
    files = folder_files(folder)
    origin, card = "", None
    if CARD_NAME in files:
        origin, card = "folder", (folder / CARD_NAME).read_text(encoding="utf-8")
    elif manifest.get("format") == FORMAT:  # saved before cards were written: write one now, as final/ would have
        origin = "written"
        card = system_card(folder, manifest, run_metrics(folder), name=card_name(folder))
        files = sorted([*files, CARD_NAME])
    if card is not None:
        card = card.replace(PLACEHOLDER, repo_id)
        if license:
            parsed = parse_card(card)
            parsed.data.license = license
            card = str(parsed)
    return UploadPlan(folder, repo_id, files, card, origin)


def _manifest(folder: Path) -> dict[str, Any]:
    """The folder's manifest.json, which must be in a prefixcap format (a saved system's or an export's)."""
    path = folder / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise HubError(f"{folder}: no manifest.json; expected a run directory, a saved system or an export") from None
    except (OSError, ValueError, RecursionError) as e:  # ValueError: bad JSON; RecursionError: nested too deeply
        raise HubError(f"{path}: unreadable manifest: {summary(e)}") from None
    fmt = manifest.get("format") if isinstance(manifest, dict) else None
    if not isinstance(fmt, str) or not fmt.startswith("prefixcap-"):
        raise HubError(f"{path}: not a prefixcap manifest (format {fmt!r})")
    return manifest


def push(plan: UploadPlan, *, private: bool = False, revision: str | None = None, message: str | None = None) -> str:
    """Create ``plan.repo_id`` (private if asked; an existing repository keeps its visibility) and upload the plan's
    files in one commit, to ``revision`` (a branch, created from main if new); returns the commit's URL."""
    import httpx2
    from huggingface_hub import CommitOperationAdd, HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    version = _version()
    api = HfApi(library_name="prefixcap", library_version=version)
    failed = f"cannot push to {plan.repo_id}"
    # The card goes up as the plan has it (the repository's id filled in), every other file as it is on disk.
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=plan.card.encode()
                                     if name == CARD_NAME and plan.card is not None else str(plan.folder / name))
                  for name in plan.files]  # fmt: skip
    try:
        api.create_repo(plan.repo_id, private=private, exist_ok=True)
        if revision:
            api.create_branch(plan.repo_id, branch=revision, exist_ok=True)
        info = api.create_commit(plan.repo_id, operations=operations, revision=revision,
                                 commit_message=message or f"Upload {plan.folder.name} with prefixcap {version}")
    except OfflineModeIsEnabled:
        raise HubError(f"{failed}: HF_HUB_OFFLINE is set, so the hub is not contacted; unset it to push (nothing "
                       "was uploaded)") from None  # fmt: skip
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else None
        hint = "; log in with `hf auth login` or set HF_TOKEN to a token that may write" if status in (401, 403) else ""
        raise HubError(f"{failed}: the hub refused ({summary(e)}){hint}; nothing was committed") from None
    except (httpx2.HTTPError, OSError) as e:  # connection refused, DNS, TLS, timeouts; a file that vanished
        raise HubError(f"{failed}: the hub at {constants.ENDPOINT} cannot be reached ({summary(e)}); nothing was "
                       "committed") from None  # fmt: skip
    return str(info.commit_url)
