"""Model folders named by Hugging Face Hub repo id (`warp-ai/wuerstchen-prior`), resolved as diffusers resolves
them: through huggingface_hub's local cache first, with a download only when the Hub is reachable and
`HF_HUB_OFFLINE` is not set. A name that is an existing path is always that folder.

diffusers' combined repo (`warp-ai/wuerstchen`) is the decoder's; its model card names the prior repo in its
front matter (`prior: [warp-ai/wuerstchen-prior]`), which diffusers follows as a connected pipeline and so
does `connected_prior` here (a repo id only, looked up on the Hub: a card never points at a local path).
"""

from __future__ import annotations

import re
from pathlib import Path

from engine.errors import WuerstchenError

REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
# What a pipeline folder is read from: configs, tokenizer files, safetensors weights, the model card.
PATTERNS = ["*.json", "*.txt", "*.safetensors", "README.md"]


def is_repo_id(name: str | Path) -> bool:
    """Whether `name` names a Hub repo rather than a folder: `owner/name`, and no such path exists here."""
    text = str(name)
    return bool(REPO_ID.match(text)) and not Path(text).exists()


def local_folder(name: str | Path, field: str) -> Path:
    """`name` as a local folder: itself, or the cached (or, online, downloaded) snapshot of the repo it names."""
    return snapshot(str(name), field) if is_repo_id(name) else Path(name)


def snapshot(repo_id: str, field: str) -> Path:
    """The local snapshot of a Hub repo's main revision; each way of failing is one line naming the field."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(repo_id, allow_patterns=PATTERNS))
    except LocalEntryNotFoundError:
        why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the Hub cannot be reached from here"
        raise WuerstchenError(
            f"{field}={repo_id!r} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and {why}: download "
            f"it where the Hub is reachable (`hf download {repo_id}`) and copy the cache, or pass a folder"
        ) from None
    except GatedRepoError:
        raise WuerstchenError(f"{field}={repo_id!r} is a gated repo: accept its terms on the Hub and log in "
                              "(`hf auth login`), or pass a folder") from None
    except RepositoryNotFoundError:
        raise WuerstchenError(f"{field}={repo_id!r}: no such repo on the Hub (or it is private): expected a repo id "
                              "such as warp-ai/wuerstchen-prior, or a folder") from None
    except (HfHubHTTPError, OSError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise WuerstchenError(f"{field}={repo_id!r} could not be fetched from the Hub: {reason}") from None


def connected_prior(folder: Path) -> str | None:
    """The prior repo that a combined repo's model card names (`prior:` in README.md's front matter), or None.
    The card is read as hostile: what it names must be a repo id (`owner/name`), never a path on this machine,
    and is then looked up on the Hub (its cache first) only (`snapshot`)."""
    readme = Path(folder) / "README.md"
    if not readme.is_file():
        return None
    from huggingface_hub import ModelCard

    try:
        named = ModelCard.load(readme).data.to_dict().get("prior")
    except (ValueError, OSError, UnicodeDecodeError):
        return None  # a card that cannot be read names nothing; the caller says what is missing
    if isinstance(named, list):
        named = named[0] if named else None
    if named is None or named == "":
        return None
    if not isinstance(named, str) or not REPO_ID.match(named) or ".." in named:
        raise WuerstchenError(f"{readme}: prior={str(named)[:80]!r} in its front matter: expected a Hub repo id "
                              "such as warp-ai/wuerstchen-prior")
    return named
