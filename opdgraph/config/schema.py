"""The typed pipeline config: `[pipeline]`, `[models.<name>]`, `[data]`, plus one typed Config per stage table.

Stage Configs live with their stage (`stages/<kind>.py`); this module holds the sections every pipeline shares and
`PipelineConfig`, the whole typed, cross-checked result of `load_pipeline`. The model shapes are resolved once at load
time (they are needed for the vocabulary check) and kept here for the compiler.
"""

from __future__ import annotations

from typing import Any, Literal

import attrs

from opdgraph.config.errors import did_you_mean
from opdgraph.config.fields import not_empty, positive, setting, valid_seed
from opdgraph.model_shapes import ModelShape

DTYPE_BYTES = {"float32": 4, "bfloat16": 2}
KernelChoice = Literal["auto", "torch", "liger"]  # models.<name>.kernels (opdgraph.models.layer_kernels)


@attrs.frozen(kw_only=True)
class HardwareConfig:
    matmul_tflops: float = setting(989.0, help="dense matmul throughput in TFLOP/s (H100 SXM bf16 dense: 989)",
                                   check=positive)
    memory_bandwidth_gbps: float = setting(3350.0, help="device memory bandwidth in GB/s (H100 SXM: 3350)",
                                           check=positive)
    pcie_gbps: float = setting(50.0, help="host<->device bandwidth in GB/s, for offload and reload", check=positive)
    interconnect_gbps: float = setting(360.0, help="GPU<->GPU all-gather bus bandwidth in GB/s (nccl-tests busbw; "
                                                   "H100 SXM NVLink: about 360), for a sharded teacher's gathers",
                                       check=positive)


FIT_CHOICES = {  # decision -> its values, in the order the search tries them (see opdgraph.fit)
    "teacher_weights": ("keep", "offload", "stream", "shard"),
    "optimizer_state": ("keep", "offload"),
    "activation_checkpointing": ("off", "on"),
    "student_gather": ("step", "layer"),
}


def _ladder(value) -> str | None:
    bad = [item for item in value if item <= 0]
    return f"every value must be > 0, got {bad}" if bad else None


def _forbidden(value) -> str | None:
    valid = [f"{decision}.{choice}" for decision, choices in FIT_CHOICES.items() for choice in choices]
    for item in value:
        if item not in valid:
            return f"unknown decision {item!r}{did_you_mean(item, valid) or ' (valid: ' + ', '.join(valid) + ')'}"
    return None


@attrs.frozen(kw_only=True)
class FitConfig:
    """`[pipeline.fit]`: how the planner may change the plan to fit memory_budget_gib (see opdgraph.fit)."""

    enabled: bool = setting(True, help="when the plan is over budget (or a decision below is forced), search "
                                       "releases, host offloads and sizes for the cheapest plan that fits")
    teacher_weights: Literal["auto", "keep", "offload", "stream", "shard"] = setting(
        "auto", help="keep on the device, offload to pinned host memory outside teacher scoring, stream layer by "
                     "layer during scoring, or shard across ranks (FSDP2; only with several ranks); auto: let the "
                     "search pick")
    optimizer_state: Literal["auto", "keep", "offload"] = setting(
        "auto", help="fp32 masters + AdamW moments: keep on the device, or keep in host memory and stream them "
                     "through the optimizer step; auto: let the search pick")
    student_gather: Literal["auto", "step", "layer"] = setting(
        "auto", help="several ranks: gather the FSDP2-sharded student once per step and keep it whole through "
                     "training (step: gradients reduced once per step; P x d of weights and of gradients more per "
                     "rank), or one layer at a time in every micro-batch (layer: least memory, the student's weights "
                     "gathered twice and its gradients reduced once per micro-batch); auto: step unless it does not "
                     "fit")
    activation_checkpointing: Literal["auto", "on", "off"] = setting(
        "auto", help="force backward.activation_checkpointing on or off; auto: let the search pick")
    micro_batch_tokens: list[int] = setting([], help="teacher_score.micro_batch_tokens values to try ([] = the "
                                                     "configured value and smaller whole-sequence multiples)",
                                            check=_ladder)
    chunk_tokens: list[int] = setting([], help="loss.chunk_tokens values to try ([] = the configured value and "
                                               "halvings down to 256)", check=_ladder)
    max_num_seqs: list[int] = setting([], help="rollout.max_num_seqs values to try ([] = the configured value and "
                                               "halvings down to 8; fewer sequences, more decode rounds)",
                                      check=_ladder)
    forbid: list[str] = setting([], help="decision values the search must not pick, e.g. "
                                         "[\"teacher_weights.stream\", \"activation_checkpointing.on\"]",
                                check=_forbidden)

    def cross_problems(self):
        for decision, choices in FIT_CHOICES.items():
            forced = getattr(self, decision)
            if forced != "auto" and f"{decision}.{forced}" in self.forbid:
                yield "forbid", f"{decision} = {forced!r} is forced and also forbidden; drop one of the two"
            elif all(f"{decision}.{choice}" in self.forbid for choice in choices):
                yield "forbid", f"every value of {decision} is forbidden; allow at least one"


def _run_name(value) -> str | None:
    """The name is a folder name (runs/<name>): a path in it would write outside runs/, an empty one into it."""
    if value.strip() in ("", ".", "..") or "/" in value or "\\" in value or "\0" in value:
        return (f"must be a plain folder name (no '/' or '\\', not empty, '.' or '..'), got {value!r}; to write "
                "elsewhere set pipeline.output_dir")
    return None


@attrs.frozen(kw_only=True)
class PipelineSection:
    name: str = setting(help="pipeline name; also names the default output directory", check=_run_name)
    num_steps: int = setting(help="number of training steps", check=positive)
    seed: int = setting(0, help="random seed for data order, sampling and initialisation", check=valid_seed)
    output_dir: str | None = setting(None, help="where checkpoints and logs go (default: runs/<name>)")
    device: Literal["auto", "cpu", "cuda"] = setting("auto", help="where to run: auto picks cuda when available")
    memory_budget_gib: float = setting(80.0, help="device memory budget; `plan` fails when the peak exceeds it",
                                       check=positive)
    fuse_training: bool = setting(True, help="fuse teacher_score -> loss -> backward into one micro-batch loop")
    release_phase_buffers: bool = setting(
        True, help="free the rollout KV pool when rollout ends and the student's gradients after the optimizer step; "
                   "false keeps both on the device for the whole run (costs memory; shows what the plan's releases "
                   "save)")
    debug_memory: bool = setting(False, help="at runtime, check at each release that the buffer is really freed")
    hardware: HardwareConfig = setting(HardwareConfig(), help="the card used for roofline time estimates")
    fit: FitConfig = setting(FitConfig(), help="the search that makes an over-budget plan fit (opdgraph.fit)")


# apply_chat_template's own parameters and the template's conversation: a template variable of these names would
# change how the prompt is tokenised or replace the messages, not set an option of the template.
RESERVED_TEMPLATE_VARIABLES = ("messages", "conversation", "tools", "documents", "chat_template",
                               "add_generation_prompt", "continue_final_message", "tokenize", "padding", "truncation",
                               "max_length", "return_tensors", "return_dict", "return_assistant_tokens_mask",
                               "tokenizer_kwargs", "sanitize_control_tokens")


def _template_variables(value) -> str | None:
    reserved = [key for key in value if key in RESERVED_TEMPLATE_VARIABLES]
    if reserved:
        return (f"{', '.join(reserved)} cannot be template variables (opdgraph sets them when it renders a prompt); "
                "remove them")
    return None


def _revision(value) -> str | None:
    return None if value.strip() and value == value.strip() else f"must be a branch, tag or commit hash, got {value!r}"


@attrs.frozen(kw_only=True)
class ModelConfig:
    dtype: Literal["float32", "bfloat16"] = setting(help="dtype the model's weights are held in on the device")
    role: Literal["student", "teacher"] = setting(help="student (trained, samples rollouts) or teacher (scores)")
    path: str | None = setting(None, help="HF model directory, Hub id owner/name (used when no such local path "
                                          "exists), config .json, .gguf file, or pkg:<pkg>/<file>")
    revision: str | None = setting(None, help="with a Hub id path: the branch, tag or commit hash (default main)",
                                   check=_revision)
    config: dict[str, Any] | None = setting(None, help="inline HF-style config dict: a randomly initialised model")
    init_from: str | None = setting(None, help="name of another model to start from (e.g. the teacher)")
    keep_layers: list[int] | None = setting(None, help="with init_from: indices of the source layers to keep")
    init_seed: int = setting(0, help="seed for random initialisation of inline-config models", check=valid_seed)
    init_device: Literal["cpu", "device"] = setting(
        "cpu", help="where random initial weights are drawn: cpu (the same seed gives the same weights on every "
                    "machine; minutes for billions of parameters) or device (on the run's device, same distribution "
                    "normal(0, initializer_range), values depend on the device's RNG)")
    offload_when_idle: bool = setting(False, help="move the weights to host memory between uses (frees device "
                                                  "memory, costs PCIe transfers)")
    kernels: KernelChoice = setting(
        "auto", help="the norms, RoPE and gated activations of this model's training and scoring forwards: torch "
                     "(plain torch ops, the reference), liger (Liger-Kernel's fused Triton kernels, forward and "
                     "backward; CUDA only, pip install liger-kernel), auto: liger where it can run, else torch. The "
                     "same activation memory either way")
    chat_template_kwargs: dict[str, Any] = setting(
        {}, help="extra variables for this model's chat template, e.g. { enable_thinking = false } (Qwen3)",
        check=_template_variables)
    chat_template: str | None = setting(None, help="a Jinja chat template file (relative to the pipeline file) "
                                                   "used instead of the tokenizer's own")
    allow_template_mismatch: bool = setting(
        False, help="teacher only: run even when this teacher's chat template renders the first prompts to other "
                    "token ids than the student's (the teacher scores the student's ids; a mismatch biases it)")

    def cross_problems(self):
        sources = [name for name in ("path", "config", "init_from") if getattr(self, name) is not None]
        if len(sources) != 1:
            found = ", ".join(sources) if sources else "none"
            yield "path", f"give exactly one of path, config, init_from (found: {found})"
        if self.keep_layers is not None and self.init_from is None:
            yield "keep_layers", "keep_layers needs init_from (the model whose layers are kept)"
        if self.revision is not None and self.path is None:
            yield "revision", "revision needs path = a Hub id (owner/name)"
        if self.allow_template_mismatch and self.role != "teacher":
            yield "allow_template_mismatch", ("allow_template_mismatch belongs on the teacher (it scores the "
                                              "student's ids with its own template's view of them)")
        if self.keep_layers is not None and not self.keep_layers:
            yield "keep_layers", "keep_layers is empty; keep at least one layer"

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]


@attrs.frozen(kw_only=True)
class DataConfig:
    train_files: list[str] = setting(help="prompt files (.jsonl), relative to the pipeline file", check=not_empty)
    prompts_per_step: int = setting(help="prompts drawn per training step", check=positive)
    eval_files: list[str] = setting([], help="held-out prompt files for [eval]")
    prompt_field: str = setting("auto", help="row field holding the prompt; auto: first of prompt/question/problem, "
                                             "or messages")
    answer_field: str = setting("answer", help="row field holding a reference answer (eval display only)")
    system_prompt: str = setting("", help="system message prepended to every prompt ('' = none)")
    samples_per_prompt: int = setting(1, help="responses sampled per prompt", check=positive)
    max_prompt_tokens: int = setting(512, help="prompts longer than this are an error (or skipped, see on_bad_row)",
                                     check=positive)
    on_bad_row: Literal["error", "skip"] = setting("error", help="what to do with a malformed or too-long row")
    shuffle: bool = setting(True, help="shuffle prompts each epoch (seeded by pipeline.seed)")

    @property
    def sequences_per_step(self) -> int:
        return self.prompts_per_step * self.samples_per_prompt


@attrs.frozen(kw_only=True)
class StageEntry:
    """One stage table: its name (the table name), its kind, and its typed Config."""

    name: str
    kind: str
    config: Any


@attrs.frozen(kw_only=True)
class PipelineConfig:
    """A loaded, typed and cross-checked pipeline."""

    pipeline: PipelineSection
    models: dict[str, ModelConfig]
    data: DataConfig
    stages: dict[str, StageEntry]
    source_file: str
    base_dir: str
    shapes: dict[str, ModelShape]
    provenance: dict[str, str] = attrs.field(eq=False)

    def model_with_role(self, role: str) -> str:
        return next(name for name, model in self.models.items() if model.role == role)
