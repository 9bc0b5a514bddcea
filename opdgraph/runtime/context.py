"""What a run holds while it executes the plan (`RunContext`), built once by opdgraph.runtime.build from the typed
config and the plan's facts, and the two settings every run makes first (the device, the seeds).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from opdgraph.errors import DeviceError
from opdgraph.runtime.buffers import BufferTable
from opdgraph.runtime.metrics import MetricsLog
from opdgraph.runtime.skipped_steps import SkippedSteps

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

@dataclass
class RunContext:
    run_dir: Path
    device: torch.device
    seed: int
    num_steps: int
    student: Any
    teacher: Any  # the first teacher with weights of its own (what a shard placement splits)
    tokenizer: Any
    engine: Any
    optimizer: Any
    sampler: Any
    eval_prompts: Any
    plan: Any
    buffers: BufferTable
    metrics: MetricsLog
    facts: dict[str, Any] = field(default_factory=dict)  # settings of other tables a stage needs, passed explicitly
    step: int = 0  # training steps completed
    stage_seconds: dict[str, float] = field(default_factory=dict)
    step_record: dict[str, Any] = field(default_factory=dict)  # metrics gathered during the current step
    eval_engines: dict[str, Any] = field(default_factory=dict)
    teacher_offloader: Any = None  # the executor's HostOffloader (moves the teacher where the plan says)
    eval_records: list[dict[str, Any]] = field(default_factory=list)
    last_samples: list[Any] = field(default_factory=list)  # a few token lists of the last rollout, for the log
    checkpoint_due: bool = False  # set by the checkpoint stage; the run loop saves at the step's end
    stopped_by: int | None = None  # the signal that stopped the run early (opdgraph.runtime.signals)
    gradients: Any = None  # opdgraph.runtime.gradients.StudentGradients: the accumulators of <student>.grads
    skipped_steps: SkippedSteps = field(default_factory=SkippedSteps)
    teachers: dict[str, Any] = field(default_factory=dict)  # teacher stage -> runtime.teachers.TeacherRuntime

    def add_seconds(self, name: str, seconds: float) -> None:
        self.stage_seconds[name] = self.stage_seconds.get(name, 0.0) + seconds

def pick_device(setting: str) -> torch.device:
    if setting == "cpu":
        return torch.device("cpu")
    if setting == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError("pipeline.device = 'cuda' but no CUDA device is available on this machine; set "
                              "pipeline.device = 'auto' or 'cpu' (e.g. --set pipeline.device=cpu)")
        return torch.device("cuda")
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")

def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
