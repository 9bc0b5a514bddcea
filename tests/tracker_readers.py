"""Read back what each experiment tracker wrote, from its own files, without opdgraph's code: W&B's offline run
file (`run-<id>.wandb`: a LevelDB-style log of wandb's protobuf Records), MLflow's file store (one text file per
metric, `timestamp value step` per line; one file per param) and TensorBoard's event files (tensorboard's
EventAccumulator). Each returns plain dicts, so tests compare them with metrics.jsonl directly.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

WANDB_BLOCK = 32768  # the LevelDB log format: 32 KiB blocks of records with a 7-byte header each
WANDB_OWN_KEYS = ("_step", "_runtime", "_timestamp")


def _wandb_payloads(path: Path):
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    offset, pending = 7, b""  # the file header: ":W&B", a 2-byte magic, a version byte
    while offset + 7 <= len(data):
        if WANDB_BLOCK - offset % WANDB_BLOCK < 7:  # a block's tail too short for a header is padding
            offset += WANDB_BLOCK - offset % WANDB_BLOCK
            continue
        length, kind = struct.unpack_from("<HB", data, offset + 4)
        chunk, offset = data[offset + 7:offset + 7 + length], offset + 7 + length
        if kind == 1:  # a whole record
            yield chunk
        elif kind == 2:  # first, middle, last pieces of a record spanning blocks
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            yield pending + chunk


def wandb_run(folder: Path) -> dict:
    """{"id", "history": {step: {key: value}}, "config": {key: value}} of one offline-run folder."""
    from wandb.proto import wandb_internal_pb2

    (path,) = folder.glob("run-*.wandb")
    run = {"id": None, "history": {}, "config": {}}
    for payload in _wandb_payloads(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run["id"] = record.run.run_id
            run["config"].update({item.key: json.loads(item.value_json) for item in record.run.config.update})
        elif kind == "config":
            run["config"].update({item.key: json.loads(item.value_json) for item in record.config.update})
        elif kind == "history":
            row = {"/".join(item.nested_key) or item.key: json.loads(item.value_json) for item in record.history.item}
            step = row.pop("_step")
            assert step not in run["history"], f"step {step} written twice in {path}"
            run["history"][step] = {key: value for key, value in row.items() if key not in WANDB_OWN_KEYS}
    return run


def mlflow_runs(store: Path) -> dict[str, dict]:
    """run id -> {"status", "metrics": {key: [(step, value), ...]}, "params": {key: value}, "artifacts": {name}}
    of every run in a file store."""
    runs = {}
    for meta in store.glob("*/*/meta.yaml"):
        folder = meta.parent
        fields = dict(line.split(": ", 1) for line in meta.read_text().splitlines() if ": " in line)
        metrics = {}
        for path in sorted((folder / "metrics").rglob("*")):
            if path.is_file():
                lines = [line.split() for line in path.read_text().splitlines()]
                metrics[str(path.relative_to(folder / "metrics"))] = [(int(step), float(value)) for _, value, step in lines]
        params = {str(p.relative_to(folder / "params")): p.read_text() for p in (folder / "params").rglob("*")
                  if p.is_file()}
        artifacts = {p.name: p for p in (folder / "artifacts").rglob("*") if p.is_file()}
        runs[folder.name] = {"status": int(fields["status"]), "metrics": metrics, "params": params,
                             "artifacts": artifacts}
    return runs


MLFLOW_STATUS = {"RUNNING": 1, "FINISHED": 3, "FAILED": 4, "KILLED": 5}  # mlflow's RunStatus numbers in meta.yaml


def tensorboard_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars: dict[str, list[tuple[int, float]]] = {}
    for events in sorted(folder.glob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend((event.step, event.value) for event in accumulator.Scalars(tag))
    return scalars


def tensorboard_texts(folder: Path) -> dict[str, str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    texts = {}
    for events in sorted(folder.glob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events), size_guidance={"tensors": 0})
        accumulator.Reload()
        for tag in accumulator.Tags()["tensors"]:
            for event in accumulator.Tensors(tag):
                texts[tag] = event.tensor_proto.string_val[0].decode()
    return texts
