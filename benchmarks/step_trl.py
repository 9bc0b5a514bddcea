"""TRL's DistillationTrainer on the same step as benchmarks/step.py (shape A), for the side-by-side table.

Same student/teacher architectures (Hugging Face Qwen2 models built from the same configs, random weights, bf16),
same prompts and lengths: 128-token prompts, exactly 256 sampled tokens (transformers generation with
min_new_tokens = max_new_tokens, so EOS cannot end a response early), reverse KL (beta = 1), temperature 1. TRL
refuses a student/teacher vocabulary mismatch, so its teacher's vocab is cut to the student's 151,936 (the two
extra 128 rows change nothing measurable). The 32 sequences of a step are generated together and trained in 4
micro-batches of 8 (gradient accumulation), like opdgraph's micro-batches; gradient checkpointing off, as ours.

Wheels it needs beyond torch/transformers/accelerate: trl==1.16.0 datasets==5.2.0 dill==0.4.1
multiprocess==0.70.19 (and psutil, xxhash, pandas, pyarrow if missing). Without them the row says 'skipped: why'.
Step seconds come from a trainer callback with CUDA synchronisation; generation seconds from a wrapper around the
student's `generate`.
"""

from __future__ import annotations

import random
import statistics
import tempfile
import time
import traceback

import torch

TRL_WHEELS = "trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19"


def word_tokenizer(num_words: int):
    """An offline word-level tokenizer: 'w<i>' -> id 3 + i; pad 0, eos 1, unk 2 (one token per word)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{f"w{i}": 3 + i for i in range(num_words)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>",
                                   unk_token="<unk>", padding_side="left")


def hf_model(config: dict, *, vocab_size: int, dtype: torch.dtype, device: torch.device):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = {key: value for key, value in config.items() if key not in ("architectures", "model_type")}
    hf_config = AutoConfig.for_model("qwen2", **{**config, "vocab_size": vocab_size})
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    return model


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_trl(shape, args, configs: tuple[dict, dict], device: torch.device) -> dict:
    try:
        import datasets
        from transformers import TrainerCallback
        from trl import DistillationConfig, DistillationTrainer
    except Exception as error:  # noqa: BLE001 - any import failure means: not runnable here
        return {"skipped": f"trl/datasets do not import ({type(error).__name__}: {error}); wheels: {TRL_WHEELS}"}
    try:
        return _run(shape, args, configs, device, datasets, TrainerCallback, DistillationConfig, DistillationTrainer)
    except Exception as error:  # noqa: BLE001 - report and let the rest of the benchmark stand
        traceback.print_exc()
        return {"error": f"{type(error).__name__}: {error}"}
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _run(shape, args, configs, device, datasets, TrainerCallback, DistillationConfig, DistillationTrainer) -> dict:
    import trl

    student_config, teacher_config = configs
    dtype = torch.float32 if args.tiny else torch.bfloat16
    vocab = student_config["vocab_size"]
    started = time.perf_counter()
    student = hf_model(student_config, vocab_size=vocab, dtype=dtype, device=device)
    teacher = hf_model(teacher_config, vocab_size=vocab, dtype=dtype, device=device)
    tokenizer = word_tokenizer(min(1000, vocab - 3))
    steps = 1 + args.trl_steps
    rng = random.Random(0)
    prompts = [" ".join(f"w{rng.randrange(min(1000, vocab - 3))}" for _ in range(shape.prompt_tokens))
               for _ in range(shape.sequences * (steps + 1))]
    dataset = datasets.Dataset.from_dict({"prompt": prompts})
    accumulation = 4 if shape.sequences % 4 == 0 else 1
    config = DistillationConfig(
        output_dir=tempfile.mkdtemp(prefix="trl_step_"), max_steps=steps, learning_rate=1e-6, beta=1.0,
        temperature=1.0, max_completion_length=shape.response_tokens,
        generation_kwargs={"min_new_tokens": shape.response_tokens},
        per_device_train_batch_size=shape.sequences // accumulation, gradient_accumulation_steps=accumulation,
        gradient_checkpointing=False, bf16=not args.tiny, use_cpu=device.type != "cuda", logging_steps=1,
        save_strategy="no", report_to="none", disable_tqdm=True, dataloader_num_workers=0, seed=0,
    )
    timings = {"step": [], "generate": []}

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *_, **__):
            _synchronize(device)
            self.started = time.perf_counter()

        def on_step_end(self, *_, **__):
            _synchronize(device)
            timings["step"].append(time.perf_counter() - self.started)

    original_generate = student.generate

    def timed_generate(*positional, **keywords):
        _synchronize(device)
        begun = time.perf_counter()
        output = original_generate(*positional, **keywords)
        _synchronize(device)
        timings["generate"].append(time.perf_counter() - begun)
        lengths.append(int(output.shape[1]) - int(keywords["input_ids"].shape[1]))
        return output

    lengths: list[int] = []
    student.generate = timed_generate
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=config, train_dataset=dataset,
                                  processing_class=tokenizer, callbacks=[StepTimer()])
    setup_seconds = time.perf_counter() - started
    trainer.train()
    measured = slice(1, None) if len(timings["step"]) > 1 else slice(None)
    seconds = statistics.median(timings["step"][measured])
    generate = statistics.median(timings["generate"][measured])
    return {"trl": trl.__version__, "setup_seconds": setup_seconds, "steps_seconds": timings["step"],
            "generate_seconds": timings["generate"], "response_lengths": lengths,
            "seconds_per_step": seconds, "stage_seconds": {"rollout": generate},
            "other_seconds": seconds - generate, "tokens_per_s": shape.tokens / seconds,
            "response_tokens_per_s": shape.sequences * shape.response_tokens / seconds,
            "note": f"teacher vocab cut to {vocab}; {accumulation} micro-batches of {shape.sequences // accumulation}"}
