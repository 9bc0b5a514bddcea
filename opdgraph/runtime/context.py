"""Everything a run holds while it executes the plan, built once from the typed config and the plan's facts.

`check_startup` (opdgraph.runtime.run) first does every check that needs no weights: the device, the tokenizers
(`load_tokenizers`: the student's and the teacher's must agree) and the prompt files. `build_context` then loads the models (an `init_from` student is built from its source model with `keep_layers`), checks
that student and teacher share a tokenizer, loads the prompt sets, creates the rollout engine with the KV pool size
the plan derived, and the optimizer with fp32 master weights. Stage `execute` functions receive this context plus
their own Config; they never see the whole pipeline config.

On CUDA the run takes the fast paths: the rollout engine samples through flashinfer with CUDA-graph decode
(`build_engine`, when rollout.backend allows it and flashinfer imports), and both models run packed attention
through FlashAttention varlen (`use_packed_attention`). CPU runs keep the plain-torch paths.
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
    teacher: Any  # the first teacher stage's model (eval's teacher)
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


def model_source(model_cfg, base_dir: Path, files: str = "weights") -> str | dict:
    """What `load_model` takes: an inline config dict, or a resolved path (pkg: paths name a file in a package; a
    Hub id is its snapshot folder in the Hub cache holding `files`, "tokenizer" or "weights", downloaded if needed:
    opdgraph.model_shapes.model_location, the rule `plan` follows too).

    A path to a config .json (e.g. the shipped real configs) means: that architecture, randomly initialised.
    """
    if model_cfg.config is not None:
        return dict(model_cfg.config)
    from opdgraph.model_shapes import model_location
    from opdgraph.models.errors import ModelLoadError

    path = model_location(model_cfg.path, str(base_dir), model_cfg.revision, files, ModelLoadError)
    if path.endswith(".json"):
        from opdgraph.model_config_check import read_config_file

        return read_config_file(path, ModelLoadError)
    return path


def load_tokenizers(models_cfg: dict, base_dir: Path, vocab_sizes: dict[str, int]) -> dict[str, Any]:
    """Every model's tokenizer, without its weights (an init_from model shares its source's), with the student's
    and the teacher's compared: a mismatch is reported in seconds, before any weights are read. `vocab_sizes` are
    the models' vocabularies from the plan's shapes."""
    from opdgraph.models.loading import load_tokenizer

    tokenizers = {name: load_tokenizer(model_source(model_cfg, base_dir, "tokenizer"), vocab_sizes[name])
                  for name, model_cfg in models_cfg.items() if model_cfg.init_from is None}
    for name in models_cfg:
        tokenizers.setdefault(name, tokenizers[_root(models_cfg, name)])
    roles = {model_cfg.role: name for name, model_cfg in models_cfg.items()}
    if "student" in roles and "teacher" in roles:
        check_same_tokenizer(tokenizers[roles["student"]], tokenizers[roles["teacher"]],
                             names=(roles["student"], roles["teacher"]))
    return tokenizers


def load_models(models_cfg: dict, base_dir: Path, device: torch.device,
                tokenizers: dict[str, Any] | None = None) -> dict[str, tuple[Any, Any]]:
    """Load every model of the pipeline; `init_from` models start from a copy of another, pruned to keep_layers.
    `tokenizers` (from load_tokenizers) are used as they are; without them each is loaded beside its weights."""
    from opdgraph.models import load_decoder, prune_layers
    from opdgraph.models.loading import load_tokenizer

    tokenizers = tokenizers or {}
    loaded: dict[str, tuple[Any, Any]] = {}
    pending = dict(models_cfg)
    while pending:
        progressed = False
        for name, model_cfg in list(pending.items()):
            dtype = TORCH_DTYPES[model_cfg.dtype]
            if model_cfg.init_from is None:
                source = model_source(model_cfg, base_dir)
                model = load_decoder(source, dtype=dtype, device=device, init_seed=model_cfg.init_seed,
                                     init_device=model_cfg.init_device)
                tokenizer = tokenizers.get(name) or load_tokenizer(source, model.config.vocab_size)
                loaded[name] = (model, tokenizer)
                _note_ignored_keys(name, model.config.hf)
            elif model_cfg.init_from in loaded:
                source_model, tokenizer = loaded[model_cfg.init_from]
                tokenizer = tokenizers.get(name) or tokenizer  # its own chat options (load_tokenizers configured it)
                layers = model_cfg.keep_layers or list(range(source_model.config.num_layers))
                loaded[name] = (prune_layers(source_model, layers).to(dtype=dtype), tokenizer)
            else:
                continue
            del pending[name]
            progressed = True
        if not progressed:  # the config checks reject cycles and unknown names; this guards the loop
            raise RuntimeError(f"models {sorted(pending)} name an init_from that cannot be loaded")
    return loaded


def _root(models_cfg: dict, name: str) -> str:
    """The model whose files an init_from model comes from (its tokenizer is that model's)."""
    while models_cfg[name].init_from is not None:
        name = models_cfg[name].init_from
    return name


def _note_ignored_keys(name: str, hf_config: dict) -> None:
    from opdgraph.model_config_check import ignored_keys

    ignored = ignored_keys(hf_config)
    if ignored:
        print(f"note: [models.{name}] config keys accepted but ignored (metadata, or set by the pipeline and the "
              f"tokenizer instead): {', '.join(ignored)}")


def check_same_tokenizer(student_tokenizer, teacher_tokenizer, names: tuple[str, str] = ("student", "teacher")) -> None:
    """Distillation over the vocabulary needs one token <-> id mapping for both models."""
    from opdgraph.models.errors import ModelLoadError

    probe = "Hello, world! 12345 The quick brown fox; def f(x): return x**2\n"
    same = (student_tokenizer is teacher_tokenizer
            or student_tokenizer.encode(probe) == teacher_tokenizer.encode(probe))
    if not same:
        raise ModelLoadError(
            f"[models.{names[0]}] and [models.{names[1]}] have different tokenizers ({student_tokenizer.name!r} vs "
            f"{teacher_tokenizer.name!r}): full-vocabulary distillation needs one token <-> id mapping; pick a "
            "teacher of the student's family (checked before any weights were loaded)"
        )


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


FLASHINFER_HEAD_DIMS = (64, 128, 256)  # head sizes flashinfer's FA2 paged kernels are built for


def _flashinfer_problem(device: torch.device, model_dtype: torch.dtype, head_dim: int | None) -> str | None:
    """Why the flashinfer rollout path cannot run here (None: it can)."""
    if device.type != "cuda":
        return f"the run is on {device.type}"
    if model_dtype not in (torch.bfloat16, torch.float16):
        return f"the student is {model_dtype} (flashinfer takes bfloat16/float16)"
    if head_dim is not None and head_dim not in FLASHINFER_HEAD_DIMS:
        # Measured: flashinfer 0.6 rejects head_dim 16 at run time ("Invalid configuration ... NUM_MMA_D_QK=1").
        return f"the student's head_dim is {head_dim} (flashinfer's kernels take {FLASHINFER_HEAD_DIMS})"
    try:
        import flashinfer  # noqa: F401
    except ImportError as error:
        return f"flashinfer does not import ({error})"
    return None


def rollout_attention(setting: str, device: torch.device, model_dtype: torch.dtype,
                      head_dim: int | None = None) -> str:
    """The engine's attention for rollout.backend: 'auto' takes flashinfer wherever it can run."""
    if setting == "torch":
        return "torch"
    problem = _flashinfer_problem(device, model_dtype, head_dim)
    if setting == "flashinfer" and problem is not None:
        raise DeviceError(f"rollout.backend = 'flashinfer' but {problem}; set rollout.backend = 'auto' or 'torch'")
    return "torch" if problem is not None else "flashinfer"


def build_engine(student, rollout, *, num_pages: int, device: torch.device, kv_dtype: torch.dtype):
    """The rollout engine; on the flashinfer path decode steps replay CUDA graphs."""
    from opdgraph.rollout import RolloutEngine

    attention = rollout_attention(rollout.backend, device, student.dtype, student.config.head_dim)
    return RolloutEngine(student, page_size=rollout.page_size, num_pages=num_pages, max_num_seqs=rollout.max_num_seqs,
                         prefill_token_budget=rollout.prefill_token_budget, device=device, kv_dtype=kv_dtype,
                         attention=attention, cuda_graphs=attention == "flashinfer",
                         decode_burst_steps=decode_burst_steps(rollout.decode_burst_steps, attention, student.config,
                                                               device),
                         fused_kernels=attention == "flashinfer" and rollout.fused_kernels)


AUTO_DECODE_BURST_STEPS = 16  # host round trips every 16 tokens: host time per token falls below the GPU's


def decode_burst_steps(setting: int, attention: str, config, device: torch.device) -> int:
    """rollout.decode_burst_steps resolved: 0 (auto) bursts on the GPU path when the Triton decode kernel supports
    the model's heads; an explicit value > 1 on CUDA needs that support too (CUDA bursts always use the kernel)."""
    from opdgraph.kernels.paged_decode_attention import supports

    supported = supports(config.num_heads, config.num_kv_heads, config.head_dim)
    if setting == 0:
        return AUTO_DECODE_BURST_STEPS if attention == "flashinfer" and supported else 1
    if setting > 1 and device.type == "cuda" and not supported:
        raise DeviceError(f"rollout.decode_burst_steps = {setting} needs the Triton decode kernel, which takes a "
                         f"power-of-two head_dim >= 16 (this model has {config.head_dim}); set it to 0 or 1")
    return setting


def use_packed_attention(models, device: torch.device) -> str:
    """Give each model the packed-attention backend for `device`; returns the one-line description for the log.

    On CUDA the RoPE inverse frequencies also move to the device (same float32 values): the decoder keeps them on
    the host, and a pageable host-to-device copy at every forward waits for the GPU to drain.
    """
    from opdgraph.kernels.varlen_attention import packed_backend_description, select_packed_backend

    for model in models:
        model.set_attention_backend(select_packed_backend(device))
        if device.type == "cuda":
            model._inv_freq = {kind: inv_freq.to(device) for kind, inv_freq in model._inv_freq.items()}
    return packed_backend_description(device)
