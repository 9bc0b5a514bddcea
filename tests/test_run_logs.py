"""Cutting a run's append-only logs back to a checkpoint on resume (opdgraph.runtime.run_logs).

The whole-run check (kill after a checkpoint, resume, compare with an uninterrupted run) is in test_run_tiny.py; these
check the pieces on hand-made logs, including TensorBoard event files, which the CPU test run does not write.
"""

from __future__ import annotations

import json
import struct

import pytest

from opdgraph.runtime.run_logs import truncate_event_file, truncate_run_logs


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _event(step: int | None, payload: bytes = b"loss") -> bytes:
    """A serialized Event: wall_time (field 1, double), step (field 2, omitted like protobuf does for 0), summary
    (field 5, length-delimited) placed after the step and before it, so the parser must skip fields of both kinds."""
    body = b"\x09" + struct.pack("<d", 1.5)
    body = b"\x2a" + _varint(len(payload)) + payload + body
    return body + (b"\x10" + _varint(step) if step else b"")


def _record(event: bytes) -> bytes:
    # Checksums are not recomputed by the truncation (records are copied whole), so any bytes stand in for them.
    return struct.pack("<Q", len(event)) + b"LCRC" + event + b"DCRC"


def test_event_file_keeps_whole_records_of_covered_steps_only(tmp_path):
    """A resumed run's TensorBoard curves would show steps twice (or lose covered ones, or break the file)."""
    records = [_record(_event(step)) for step in (None, 1, 2, 3, 4, 300, -1)]
    path = tmp_path / "events.out.tfevents.1"
    path.write_bytes(b"".join(records) + records[4][:9])  # ends with a record cut short by the kill
    truncate_event_file(path, last_step=3)
    assert path.read_bytes() == b"".join(records[i] for i in (0, 1, 2, 3, 6))


def test_run_logs_keep_every_line_up_to_the_checkpoint_step(tmp_path):
    """Lines of covered steps (the checkpoint step's own included) must survive; later ones must go, in every log."""
    metrics = [{"kind": "eval", "step": 0}, {"kind": "train", "step": 1}, {"kind": "eval", "step": 2},
               {"kind": "train", "step": 2}, {"kind": "train", "step": 3}]
    samples = [{"label": "before", "step": 0}, {"label": "rollout", "step": 2}, {"label": "rollout", "step": 3}]
    for name, records in (("metrics.jsonl", metrics), ("samples.jsonl", samples)):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "tensorboard").mkdir()
    (tmp_path / "tensorboard" / "events.out.tfevents.7").write_bytes(_record(_event(2)) + _record(_event(3)))
    truncate_run_logs(tmp_path, last_step=2)
    read = lambda name: [json.loads(line) for line in (tmp_path / name).read_text().splitlines()]  # noqa: E731
    assert read("metrics.jsonl") == metrics[:4] and read("samples.jsonl") == samples[:2]
    assert (tmp_path / "tensorboard" / "events.out.tfevents.7").read_bytes() == _record(_event(2))


def test_real_tensorboard_file_stays_readable(tmp_path):
    """With TensorBoard installed: a truncated file must still pass its reader's checksums and hold steps <= S."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(tmp_path))
    for step in range(1, 6):
        writer.add_scalar("train/loss", 1.0 / step, step)
    writer.close()
    (path,) = tmp_path.glob("events.out.tfevents.*")
    truncate_event_file(path, last_step=3)
    steps = [event.step for event in EventFileLoader(str(path)).Load() if event.HasField("summary")]
    assert steps == [1, 2, 3]


def test_torn_last_line_is_dropped_and_a_damaged_middle_line_named(tmp_path):
    """A kill in the middle of a write leaves half a JSON line at the end: resume must drop it rather than crash
    (found in review); a bad line anywhere else is real damage and must be reported with its file and line."""
    from opdgraph.runtime.run_logs import truncate_jsonl

    log = tmp_path / "samples.jsonl"
    log.write_text('{"step": 1, "text": "a"}\n{"step": 2, "text": "b"}\n{"step": 3, "te')
    truncate_jsonl(log, last_step=2)
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2]
    log.write_text('{"step": 1}\n{"step": 2\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"samples\.jsonl:2: not valid JSON"):
        truncate_jsonl(log, last_step=3)
