"""The pipeline that benchmarks/step.py times, on disk: the step shapes, the model pair, the pipeline file.

A shape is the per-step batch (sequences, prompt and response tokens) and how many steps are measured; A and B are
the benchmark's, the tiny ones its CPU smoke run's. write_pipeline writes the pipeline file, the two model configs and
a prompt file of exact-length prompts into a directory, for the real runtime to load (step_timing.run_ours) and for
multi_gpu.py's shape B. model_configs is looked up at call time by write_pipeline, so qwen35_gpu.py can swap in its
own model pair.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class StepShape:
    name: str
    sequences: int
    prompt_tokens: int
    response_tokens: int
    steps: int  # measured steps, after the warmup steps

    @property
    def tokens(self) -> int:
        return self.sequences * (self.prompt_tokens + self.response_tokens)


SHAPES = {"A": StepShape("A", 32, 128, 256, 3), "B": StepShape("B", 128, 256, 1024, 2)}
TINY_SHAPES = {"A": StepShape("A", 4, 16, 8, 2), "B": StepShape("B", 6, 24, 16, 2)}


def model_configs(tiny: bool) -> tuple[dict, dict]:
    if tiny:
        from opdgraph.models.tiny_configs import tiny_config

        student, teacher = tiny_config("qwen2"), tiny_config("qwen2_untied")
        teacher.update(hidden_size=96, vocab_size=320)  # a bigger teacher with a longer vocab, as in the real pair
        return student, teacher
    from opdgraph.model_shapes import resolve_path

    def read(name):
        return json.loads(Path(resolve_path(f"pkg:opdgraph/model_configs/{name}", ".")).read_text())

    return read("qwen2.5-1.5b-instruct.json"), read("qwen2.5-7b-instruct.json")


def write_pipeline(directory: Path, shape: StepShape, *, tiny: bool, micro_batch_tokens: int,
                   chunk_tokens: int, init_device: str = "device") -> Path:
    """A pipeline file for the shape, its two model configs and a prompt file of exact-length prompts.

    Random weights are drawn on the run's device by default (models.<name>.init_device): drawing 9B parameters on
    the CPU takes minutes, and the speed of a step does not depend on the values.
    """
    student, teacher = model_configs(tiny)
    (directory / "student.json").write_text(json.dumps(student))
    (directory / "teacher.json").write_text(json.dumps(teacher))
    # The byte tokenizer's chat wraps a user message in 4 ids (bos, <|user|>, <|end|>, <|assistant|>).
    rng = random.Random(0)
    with open(directory / "prompts.jsonl", "w") as prompts:
        for _ in range(shape.sequences * (shape.steps + 3)):
            text = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(shape.prompt_tokens - 4))
            prompts.write(json.dumps({"prompt": text}) + "\n")
    dtype = "float32" if tiny else "bfloat16"
    text = f"""
[pipeline]
name = "step_bench_{shape.name}"
num_steps = {shape.steps + 2}
seed = 0
memory_budget_gib = 80.0
output_dir = "{directory / 'run'}"

[models.student]
role = "student"
dtype = "{dtype}"
path = "student.json"
init_device = "{init_device}"

[models.teacher]
role = "teacher"
dtype = "{dtype}"
path = "teacher.json"
init_device = "{init_device}"

[data]
train_files = ["prompts.jsonl"]
prompts_per_step = {shape.sequences}
samples_per_prompt = 1
max_prompt_tokens = {shape.prompt_tokens}

[rollout]
max_new_tokens = {shape.response_tokens}
temperature = 1.0
max_num_seqs = {shape.sequences}
page_size = 16
prefill_token_budget = {max(2048, min(8192, shape.sequences * shape.prompt_tokens))}

[teacher_score]
micro_batch_tokens = {micro_batch_tokens}

[loss]
divergence = "reverse_kl"
chunk_tokens = {chunk_tokens}

[backward]
activation_checkpointing = false

[step]
lr = 1e-6
max_grad_norm = 1.0

[log]
progress = false
"""
    path = directory / "pipeline.toml"
    path.write_text(text)
    return path
