"""Resume support for a run's append-only logs: cut each back to the steps the resumed checkpoint covers.

A run killed after its step-S checkpoint may have logged steps S+1, S+2, ... before it died; `--resume` continues
from step S, so it would log those steps again. `truncate_run_logs(run_dir, S)` keeps, in every append-only log,
exactly the records of steps 0..S (everything written for a covered step stays) and drops the rest:

- `metrics.jsonl` and `samples.jsonl`: one JSON object per line, each with its `step`;
- TensorBoard event files (`tensorboard/events.out.tfevents.*`, when TensorBoard wrote any): TFRecord files of
  Event protos. Records are copied byte for byte (their checksums stay valid); only each record's step field is
  parsed. A record cut short by the kill is dropped, as it never was whole.

Each log is rewritten beside itself and renamed over the old one (opdgraph.runtime.durable.replace_text), so a kill
during the cut leaves the old log or the cut one, never a partial file. A log damaged before its last line is a
RunDirectoryError naming the line.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from opdgraph.errors import RunDirectoryError
from opdgraph.runtime.durable import replace_bytes, replace_text

JSON_LOGS = ("metrics.jsonl", "samples.jsonl")
TENSORBOARD_DIR = "tensorboard"
EVENT_STEP_FIELD = 2  # tensorboard's Event proto: `int64 step = 2;` (wall_time = 1, the payload from 3 on)


def truncate_run_logs(run_dir: Path, last_step: int) -> None:
    """Keep only records of steps <= last_step in every append-only log of `run_dir` (missing logs are skipped)."""
    run_dir = Path(run_dir)
    for name in JSON_LOGS:
        truncate_jsonl(run_dir / name, last_step)
    for events in sorted((run_dir / TENSORBOARD_DIR).glob("events.out.tfevents.*")):
        truncate_event_file(events, last_step)


def truncate_jsonl(path: Path, last_step: int) -> None:
    """A JSON-lines log without the lines of steps after last_step (a line without a step belongs to step 0)."""
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept = []
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            if number == len(lines):  # a kill mid-write leaves a torn last line: it belongs to no complete step
                print(f"resume: dropping the unfinished last line of {path}")
                break
            raise RunDirectoryError(f"{path}:{number}: not valid JSON ({error}); the run log is damaged: fix or "
                                    "remove that line, then resume again") from error
        step = record.get("step", 0) if isinstance(record, dict) else None
        if not isinstance(step, int) or isinstance(step, bool):
            raise RunDirectoryError(f"{path}:{number}: not a record of this log (a JSON object with an integer "
                                    f"\"step\"): {line[:80]}; the run log is damaged: fix or remove that line, then "
                                    "resume again")
        if step <= last_step:
            kept.append(line)
    replace_text(path, "".join(line + "\n" for line in kept))


def truncate_event_file(path: Path, last_step: int) -> None:
    """A TensorBoard event file without the events of steps after last_step."""
    data = path.read_bytes()
    kept, offset = bytearray(), 0
    while offset + 12 <= len(data):
        (length,) = struct.unpack_from("<Q", data, offset)
        end = offset + 12 + length + 4  # length, its crc, the event, its crc
        if end > len(data):
            break
        if _event_step(data[offset + 12:offset + 12 + length]) <= last_step:
            kept += data[offset:end]
        offset = end
    replace_bytes(path, bytes(kept))


def _varint(data: bytes, offset: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        byte = data[offset]
        offset += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, offset


def _event_step(event: bytes) -> int:
    """The step of one serialized Event (0 when absent, as protobuf defaults it)."""
    offset = 0
    while offset < len(event):
        key, offset = _varint(event, offset)
        field, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, offset = _varint(event, offset)
            if field == EVENT_STEP_FIELD:
                return value - (1 << 64) if value >= 1 << 63 else value  # int64 two's complement
        elif wire_type == 1:
            offset += 8
        elif wire_type == 2:
            size, offset = _varint(event, offset)
            offset += size
        elif wire_type == 5:
            offset += 4
        else:  # groups (3, 4) are not used by Event; stop rather than misread
            break
    return 0
