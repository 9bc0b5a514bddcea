"""Models named by a Hugging Face Hub id (`path = "org/name"`, optional `revision`): found in the local Hub cache,
else downloaded with huggingface_hub, and given to the planner and the runtime as one snapshot directory.

`plan` asks for the "config" files (config.json only), `run --check` for the "tokenizer" files, `run` for the
"weights" as well; all three land in the same `snapshots/<commit>/` folder of the cache, so plan and run read the
same model. The cache is tried first and, when it holds what is asked for, nothing goes over the network (a cached
`main` is used as it is; `huggingface-cli download` refreshes it). Offline (HF_HUB_OFFLINE=1) and not cached is an
error naming the id, the cache folder and the command that downloads it.

The environment is read at call time (HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub; HF_HUB_OFFLINE):
huggingface_hub reads it once at import, which a library user or a test setting it later would not see.
Torch-free; huggingface_hub is imported only when a Hub id is resolved.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

BYTE_TOKENIZER_FILE = "opdgraph_byte_tokenizer.json"  # opdgraph.models.tokenizers' marker (a saved byte tokenizer)
TOKENIZER_PATTERNS = ["tokenizer*", BYTE_TOKENIZER_FILE, "vocab.json", "merges.txt", "special_tokens_map.json",
                      "added_tokens.json", "chat_template.json", "chat_template.jinja", "generation_config.json"]
FILE_PATTERNS = {  # what each caller needs from the repository
    "config": ["config.json"],
    "tokenizer": ["config.json", *TOKENIZER_PATTERNS],
    "weights": ["config.json", *TOKENIZER_PATTERNS, "*.safetensors", "model.safetensors.index.json"],
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", BYTE_TOKENIZER_FILE)
# owner/name of the Hub's repo ids: letters, digits, '-', '_', '.'; each part starts and ends with a letter, digit or
# '_' (huggingface_hub's validate_repo_id), at most 96 characters.
_PART = r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?"
HUB_ID = re.compile(rf"^{_PART}/{_PART}$")
TRUE_VALUES = {"1", "on", "yes", "true"}


def looks_like_hub_id(path: str) -> bool:
    """The form of a Hub id: owner/name (one slash, valid characters), not pkg:, not a .gguf or .json file name.
    (Whether a path IS a Hub id also needs it to be absent on disk: opdgraph.model_shapes.model_location.)"""
    if path.startswith("pkg:") or path.endswith((".gguf", ".json")) or "--" in path or ".." in path:
        return False
    return HUB_ID.match(path) is not None


def hub_cache_dir() -> Path:
    """The Hub cache folder huggingface_hub would use with the current environment."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.path.expanduser(os.environ["HF_HUB_CACHE"]))
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(os.path.expanduser(home)) / "hub"


def hub_offline() -> bool:
    """HF_HUB_OFFLINE now, or when huggingface_hub was imported (it then refuses every request)."""
    from huggingface_hub import constants

    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in TRUE_VALUES or bool(constants.HF_HUB_OFFLINE)


def download_command(repo_id: str, revision: str | None) -> str:
    return f"huggingface-cli download {repo_id}" + (f" --revision {revision}" if revision else "")


def snapshot_commit(directory: str) -> str | None:
    """The commit hash of a Hub cache snapshot folder (`.../snapshots/<commit>`), None for any other directory."""
    folder = Path(directory)
    return folder.name if folder.parent.name == "snapshots" else None


def missing_files(directory: Path, files: str) -> list[str]:
    """What `files` needs that the snapshot folder lacks (huggingface_hub cannot tell for a hand-made cache)."""
    missing = [] if (directory / "config.json").is_file() else ["config.json"]
    if files in ("tokenizer", "weights") and not any((directory / name).is_file() for name in TOKENIZER_FILES):
        missing.append(" or ".join(TOKENIZER_FILES))
    if files == "weights":
        index = directory / "model.safetensors.index.json"
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
                return [f"a readable {index.name} (it is damaged: delete the snapshot and download it again)"]
            missing += [shard for shard in shards if not (directory / shard).is_file()]
        elif not (directory / "model.safetensors").is_file():
            missing.append("model.safetensors")
    return missing


def hub_snapshot(repo_id: str, revision: str | None, files: str, error: type[Exception], local: str = "") -> str:
    """The local snapshot folder of `repo_id` at `revision` (None: main) holding `files` ("config", "tokenizer"
    or "weights"): the cache when it has them, else a download (huggingface_hub's progress bars on stderr).
    Failures raise `error` (an OpdgraphError subclass) naming the id, the cache and what to do."""
    import huggingface_hub
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    cache = hub_cache_dir()
    where = f"Hub model {repo_id!r}" + (f" at revision {revision!r}" if revision else "")
    if local:  # the same words could have meant a local folder: say that none exists
        where += f" (no local path {local} exists either; write ./{repo_id} to mean a local folder)"
    options = dict(repo_id=repo_id, revision=revision, cache_dir=str(cache), allow_patterns=FILE_PATTERNS[files])
    try:
        directory = huggingface_hub.snapshot_download(**options, local_files_only=True)
        missing = missing_files(Path(directory), files)
        # The rest of a partly cached snapshot comes from the same commit: plan (config.json) and run (weights)
        # must not read two commits of a branch that moved in between.
        options["revision"] = snapshot_commit(directory) or revision
    except LocalEntryNotFoundError:
        missing = ["the snapshot"]
    except HFValidationError as problem:  # e.g. a revision the Hub cannot name
        raise error(f"{where}: {problem}; fix the id or the revision") from problem
    if not missing:
        return directory
    if hub_offline():
        raise error(f"{where} is not in the local Hub cache ({cache}: {', '.join(missing)} missing) and "
                    f"HF_HUB_OFFLINE is set; download it where the network is reachable: "
                    f"`{download_command(repo_id, revision)}` (with HF_HUB_CACHE={cache}), or unset HF_HUB_OFFLINE")
    try:
        directory = huggingface_hub.snapshot_download(**options)
    except Exception as problem:  # noqa: BLE001 -- any failure of the download (HTTP, proxy, disk) is the user's to fix
        raise error(f"{where}: cannot download it into {cache}: {problem}; check the id and revision on "
                    f"huggingface.co (gated models need `huggingface-cli login`), or download it with "
                    f"`{download_command(repo_id, revision)}`") from problem
    missing = missing_files(Path(directory), files)
    if missing:
        raise error(f"{where} ({directory}) has no {', '.join(missing)}: opdgraph needs an HF checkpoint with "
                    "config.json, tokenizer files and safetensors weights")
    return directory
