"""A whole run of tiny Qwen3.5 student and teacher (CPU): rollout through the state pool, teacher scoring, the loss
and backward through the gated-DeltaNet layers, the optimizer step, eval and a checkpoint that transformers loads.

A failure means one of the runtime's paths breaks on the hybrid family, or its saved student is not a Qwen3.5
checkpoint transformers reads with the same logits.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import transformers

from opdgraph.compile import compile_plan
from opdgraph.config import load_pipeline
from opdgraph.models import load_decoder
from opdgraph.models.packing import pack
from opdgraph.runtime.run import run_pipeline

PIPELINES = Path(__file__).resolve().parents[1] / "pipelines"
HYBRID = ('model_type = "qwen3_5_text", num_hidden_layers = 4, head_dim = 16, linear_num_key_heads = 2, '
          'linear_num_value_heads = 4, linear_key_head_dim = 16, linear_value_head_dim = 8, ')


def test_tiny_qwen35_run_trains_and_saves_a_transformers_checkpoint(tmp_path):
    text = (PIPELINES / "tiny.toml").read_text()
    text = text.replace('model_type = "llama", ', HYBRID).replace("num_hidden_layers = 2, ", "")
    text = text.replace("num_hidden_layers = 3, ", "").replace('"data/', f'"{PIPELINES}/data/')
    pipeline = tmp_path / "tiny_qwen35.toml"
    pipeline.write_text(text)
    cfg = load_pipeline(str(pipeline), [f"pipeline.output_dir={tmp_path / 'run'}", "log.progress=false",
                               "pipeline.device=cpu", "pipeline.num_steps=2",
                                        "eval.every_n_steps=2", "checkpoint.every_n_steps=2",
                                        "rollout.max_new_tokens=12"])
    assert cfg.shapes["student"].linear_layers == 3
    run_pipeline(cfg, compile_plan(cfg))
    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
             if '"step"' in line and '"loss"' in line]
    assert len(steps) == 2 and all(math.isfinite(record["loss"]) for record in steps)
    student = next((tmp_path / "run" / "checkpoints").glob("step-*")) / "student"
    ours = load_decoder(student, dtype=torch.float32)
    reference = transformers.AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32)
    assert type(reference).__name__ == "Qwen3_5ForCausalLM"
    ids = [5, 9, 200, 17, 3, 77, 1, 250, 42]
    input_ids, positions, meta = pack([ids])
    with torch.no_grad():
        logits = ours.logits(ours.forward_hidden(input_ids, positions, meta))
        expected = reference(torch.tensor([ids])).logits[0]
    assert ((logits - expected).abs().max() / expected.abs().max()) < 1e-5
