"""Models named by a Hub id, resolved from a Hub cache built by hand in tmp_path (HF_HUB_OFFLINE=1: no network).

The cache layout is huggingface_hub's: models--<org>--<name>/refs/<branch or tag> holds a commit hash,
snapshots/<commit>/ the files. What these protect: plan reads the cached config.json of the right revision, run
reads the very same snapshot folder, and a model that is neither cached nor downloadable is an error that says how
to get it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from opdgraph.config import ConfigError, load_pipeline
from opdgraph.hub import looks_like_hub_id
from opdgraph.model_shapes import ShapeError, model_location
from opdgraph.models.errors import ModelLoadError
from opdgraph.runtime.config_record import config_record
from opdgraph.runtime.model_loading import model_source

PIPELINES = Path(__file__).parent.parent / "pipelines"
TINY = PIPELINES / "tiny.toml"
REPO = "testorg/tiny-teacher"
MAIN_COMMIT = "a" * 40
PINNED_COMMIT = "b" * 40


def teacher_config(num_layers: int) -> dict:
    config = dict(load_pipeline(str(TINY)).models["teacher"].config)
    return {**config, "num_hidden_layers": num_layers}


def add_snapshot(cache: Path, repo: str, commit: str, files: dict[str, str], refs: tuple[str, ...] = ()) -> Path:
    """One snapshot of `repo` in a hand-made Hub cache; each ref in `refs` points at it."""
    storage = cache / ("models--" + repo.replace("/", "--"))
    snapshot = storage / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (snapshot / name).write_text(text)
    for ref in refs:
        (storage / "refs").mkdir(parents=True, exist_ok=True)
        (storage / "refs" / ref).write_text(commit)  # huggingface_hub writes the hash without a newline
    return snapshot


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A Hub cache with REPO at main (3 layers, byte tokenizer) and at a pinned commit / tag v2 (5 layers)."""
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    byte_tokenizer = {"opdgraph_byte_tokenizer.json": json.dumps({"name": "opdgraph-byte-v1"})}
    add_snapshot(cache, REPO, MAIN_COMMIT, {"config.json": json.dumps(teacher_config(3)), **byte_tokenizer},
                 refs=("main",))
    add_snapshot(cache, REPO, PINNED_COMMIT, {"config.json": json.dumps(teacher_config(5)), **byte_tokenizer},
                 refs=("v2",))
    return cache


def hub_pipeline(tmp_path: Path, teacher_lines: str) -> str:
    """tiny.toml with the teacher given by `teacher_lines` (e.g. a Hub id path) instead of its inline config."""
    text = TINY.read_text().replace('"data/', f'"{PIPELINES}/data/')
    teacher_config_line = next(line for line in text.splitlines()
                               if line.startswith("config =") and "initializer_range" in line)
    file = tmp_path / "hub_pipeline.toml"
    file.write_text(text.replace(teacher_config_line, teacher_lines))
    return str(file)


@pytest.mark.parametrize("path, is_hub_form", [
    ("Qwen/Qwen3-1.7B", True), ("meta-llama/Llama-3.2-1B", True), ("org_1/name.v2", True),
    ("Qwen3-1.7B", False),  # no owner: a relative directory name, never guessed to be a Hub id
    ("models/org/name", False), ("org/name.json", False), ("org/name.gguf", False),
    ("pkg:opdgraph/model_configs", False), ("org/../name", False), ("org--x/name", False), ("/abs/path", False),
    ("-org/name", False), ("org/", False), ("org/name.", False), ("org-/name", False), ("o/" + "n" * 96, True),
    ("o/" + "n" * 97, False),
])
def test_hub_id_form(path, is_hub_form):
    """If this fails, a local file name is sent to the Hub, or a valid owner/name id is read as a missing file."""
    assert looks_like_hub_id(path) is is_hub_form


def test_plan_reads_the_cached_config(cache, tmp_path):
    """If this fails, plan does not find a cached Hub model offline, or reads another revision than main."""
    cfg = load_pipeline(hub_pipeline(tmp_path, f'path = "{REPO}"'))
    assert cfg.shapes["teacher"].layers == 3
    assert config_record(cfg)["values"]["models.teacher.resolved_revision"] == MAIN_COMMIT


@pytest.mark.parametrize("revision", [PINNED_COMMIT, "v2"])
def test_revision_pins_the_snapshot(cache, tmp_path, revision):
    """If this fails, `revision` is ignored (main is read) or a tag is not followed to its commit."""
    cfg = load_pipeline(hub_pipeline(tmp_path, f'path = "{REPO}"\nrevision = "{revision}"'))
    assert cfg.shapes["teacher"].layers == 5
    assert config_record(cfg)["values"]["models.teacher.resolved_revision"] == PINNED_COMMIT


def test_a_local_directory_wins_over_a_hub_id(cache, tmp_path):
    """If this fails, a local model directory whose relative path looks like owner/name is fetched from the Hub."""
    local = tmp_path / REPO
    local.mkdir(parents=True)
    (local / "config.json").write_text(json.dumps(teacher_config(2)))
    assert model_location(REPO, str(tmp_path), None, "config", ShapeError) == str(local)
    with pytest.raises(ShapeError, match="revision applies to Hub ids only"):
        model_location(REPO, str(tmp_path), "v2", "config", ShapeError)


@pytest.mark.parametrize("revision, command", [
    (None, "huggingface-cli download testorg/absent`"),
    ("v1.0", "huggingface-cli download testorg/absent --revision v1.0`"),
])
def test_offline_and_not_cached_says_how_to_download(cache, tmp_path, revision, command):
    """If this fails, an offline plan of an uncached model fails without naming the id, the cache looked in, or the
    command that downloads it."""
    revision_line = f'\nrevision = "{revision}"' if revision else ""
    with pytest.raises(ConfigError) as raised:
        load_pipeline(hub_pipeline(tmp_path, f'path = "testorg/absent"{revision_line}'))
    message = str(raised.value)
    assert "models.teacher.path" in message and "'testorg/absent'" in message
    assert str(cache) in message and "HF_HUB_OFFLINE" in message and command in message


def test_run_check_reads_the_same_snapshot(cache, tmp_path, monkeypatch):
    """If this fails, run loads its tokenizer (and weights) from another folder than the one plan read, or a run
    without cached weights starts instead of saying how to download them."""
    import opdgraph.models.loading as loading
    from opdgraph.runtime import startup as run

    cfg = load_pipeline(hub_pipeline(tmp_path, f'path = "{REPO}"\nrevision = "v2"'))
    planned = model_location(REPO, cfg.base_dir, "v2", "config", ShapeError)
    assert Path(planned) == cache / "models--testorg--tiny-teacher" / "snapshots" / PINNED_COMMIT
    sources = []
    real = loading.load_tokenizer
    monkeypatch.setattr(loading, "load_tokenizer", lambda source, vocab: sources.append(source) or real(source, vocab))
    run.check_startup(cfg)
    assert planned in sources
    with pytest.raises(ModelLoadError, match=r"model.safetensors missing.*huggingface-cli download "
                                             rf"{REPO} --revision v2"):
        model_source(cfg.models["teacher"], Path(cfg.base_dir), "weights")
    (Path(planned) / "model.safetensors").write_bytes(b"")  # present is all the resolution looks at
    assert model_source(cfg.models["teacher"], Path(cfg.base_dir), "weights") == planned


def test_online_and_not_cached_downloads_only_what_is_needed(cache, monkeypatch):
    """If this fails, an online plan does not download a missing model, or downloads more than config.json for
    plan (a plan would fetch many GB of weights), or the weights are not asked for by run."""
    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    real = huggingface_hub.snapshot_download
    requests = []

    def fake_download(**options):  # stands in for the network: puts the snapshot into the cache, then reads it
        if not options.get("local_files_only"):
            requests.append(options["allow_patterns"])
            add_snapshot(cache, options["repo_id"], "c" * 40, {"config.json": json.dumps(teacher_config(4)),
                                                               "model.safetensors": ""}, refs=("main",))
        return real(**options)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    directory = model_location("testorg/online", "/nonexistent", None, "config", ShapeError)
    assert Path(directory) == cache / "models--testorg--online" / "snapshots" / ("c" * 40)
    assert requests == [["config.json"]]
    with pytest.raises(ModelLoadError, match="has no tokenizer.json"):  # downloaded, but no tokenizer in the repo
        model_location("testorg/online", "/nonexistent", None, "weights", ModelLoadError)
    assert "*.safetensors" in requests[-1] and "tokenizer*" in requests[-1]


def test_a_missing_folder_under_an_existing_one_is_local_not_the_hub(cache, tmp_path):
    """If this fails, `path = "models/student"` (a checkpoint not written yet, or a typo) is looked up on the Hub
    and the error talks about downloading 'models/student' instead of the missing local folder."""
    (tmp_path / "models").mkdir()
    located = model_location("models/student", str(tmp_path), None, "config", ShapeError)
    assert located == str(tmp_path / "models" / "student")
    from opdgraph.model_shapes import shape_from_path

    with pytest.raises(ShapeError, match="no config.json") as caught:
        shape_from_path("models/student", str(tmp_path))
    assert "huggingface-cli" not in str(caught.value)
    with pytest.raises(ShapeError, match=r"no local path .* exists either; write \./org/absent"):
        model_location("org/absent", str(tmp_path), None, "config", ShapeError)
