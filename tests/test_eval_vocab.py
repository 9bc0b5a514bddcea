"""A student vocabulary smaller than the teacher's (Qwen2.5-1.5B 151936 vs 7B 152064) is supported in eval too.

The loss already drops the teacher's extra columns; eval has the teacher answer too, and the student then reads the
teacher's tokens. The teacher must answer in the shared vocabulary (RolloutEngine(vocab_limit=...)), else an id
beyond the student's embedding crashes eval with an IndexError, as it did.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from opdgraph.compile import compile_plan
from opdgraph.config import load_pipeline
from opdgraph.models import load_decoder
from opdgraph.models.tiny_configs import tiny_config
from opdgraph.rollout import Request, RolloutEngine, SamplingParams
from opdgraph.runtime.run import run_pipeline

TINY = Path(__file__).resolve().parents[1] / "pipelines" / "tiny.toml"


def favouring_high_ids(limit: int):
    """A tiny decoder whose output rows beyond `limit` dominate the logits, so unlimited sampling picks them."""
    model = load_decoder(tiny_config("llama"), dtype=torch.float32)
    with torch.no_grad():
        model.lm_head_weight[limit:] *= 50.0
    return model


@pytest.mark.parametrize("params", [SamplingParams(max_new_tokens=12, greedy=True),
                                    SamplingParams(max_new_tokens=12, temperature=1.0)])
@pytest.mark.parametrize("decode_burst_steps", [1, 4])
def test_vocab_limit_keeps_every_sampled_id_below_it(params, decode_burst_steps):
    """If this fails, the engine samples ids beyond vocab_limit (on the step path or inside decode bursts)."""
    model = favouring_high_ids(100)
    requests = [Request(f"r{i}", [3, 5, 7 + i], params, n=2, seed=i) for i in range(3)]

    def generate(limit):
        engine = RolloutEngine(model, page_size=4, num_pages=64, max_num_seqs=8, prefill_token_budget=16,
                               device="cpu", decode_burst_steps=decode_burst_steps, vocab_limit=limit)
        return [token for response in engine.generate(requests) for token in response.token_ids]

    assert max(generate(None)) >= 100  # the model really prefers the high ids
    assert max(generate(100)) < 100


def test_eval_with_a_larger_teacher_vocabulary_runs(tmp_path):
    """If this fails, a pipeline whose teacher has more vocabulary rows than the student passes `plan` and then
    crashes in eval (the student embedding the teacher's ids), or eval's teacher answers outside the student's
    vocabulary."""
    cfg = load_pipeline(TINY, [f"pipeline.output_dir={tmp_path / 'run'}", "log.progress=false",
                               "pipeline.device=cpu", "pipeline.num_steps=1",
                               "models.teacher.config.vocab_size=4096", "eval.num_prompts=2",
                               "checkpoint.every_n_steps=0"])
    assert cfg.shapes["teacher"].vocab > cfg.shapes["student"].vocab
    ctx = run_pipeline(cfg, compile_plan(cfg))
    assert [record["label"] for record in ctx.eval_records] == ["before", "final"]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(record["teacher_text_reverse_kl"] >= 0 for record in records if record["kind"] == "eval")
    teacher = ctx.eval_engines["eval.teacher"]
    assert teacher.vocab_limit == cfg.shapes["student"].vocab
