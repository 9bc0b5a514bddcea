"""The rollout stage at run time: this step's prompts -> the student's sampled responses -> training micro-batches.

Each prompt's seed comes from (pipeline seed, step, the prompt's index in the step's global batch), so a run's
samples do not depend on scheduling, preemption, the number of ranks or a resume. With several ranks each rolls
out its own share of prompts; the counts the loss normalises by are summed over ranks (see distributed.py).
In a hybrid SFT pipeline each prompt first gets its gold prefix for this step (opdgraph.data.gold_prefix): the
student continues from it, and the sft stage's normalisation counts (global prefix tokens, sequences with one) are
summed over ranks like the loss's.
"""

from __future__ import annotations

from dataclasses import dataclass

from opdgraph.data.gold_prefix import with_gold_prefix
from opdgraph.runtime.batches import MicroBatch, Sample, build_micro_batches
from opdgraph.runtime.distributed import all_reduce_max, all_reduce_sum, pad_micro_batches


@dataclass
class RolloutBatch:
    """The `responses` buffer: this rank's samples and the micro-batches the training loop runs over."""

    samples: list[Sample]
    micro_batches: list[MicroBatch]


def sampling_params(config, *, max_new_tokens: int, greedy: bool, eos_token_ids):
    from opdgraph.rollout import SamplingParams

    return SamplingParams(max_new_tokens=max_new_tokens, temperature=config.temperature, top_p=config.top_p,
                          top_k=config.top_k, min_p=config.min_p, greedy=greedy,
                          stop_token_ids=tuple(config.stop_token_ids), eos_token_ids=tuple(eos_token_ids))


def generate_samples(engine, prompts, params, *, n: int, seed: int, step: int, tag: str) -> list[Sample]:
    """Sample `n` responses per prompt; `prompts` are SampledPrompt records of the data sampler."""
    from opdgraph.data import sample_seed
    from opdgraph.rollout import Request

    requests = [Request(request_id=f"{tag}{step}-{p.index_in_step}", prompt_ids=list(p.record.prompt_ids),
                        params=params, n=n, seed=sample_seed(seed, step, p.index_in_step)) for p in prompts]
    responses = engine.generate(requests)
    by_id = {r.request_id: p for r, p in zip(requests, prompts)}
    return [Sample(prompt_ids=list(r.prompt_ids), response_ids=list(r.token_ids),
                   prompt_index=by_id[r.request_id].index_in_step, sample_index=r.sample_index,
                   finish_reason=r.finish_reason, logprobs=list(r.logprobs), answer=by_id[r.request_id].record.answer,
                   teacher_prompt_ids={stage: list(ids) for stage, ids in
                                       by_id[r.request_id].record.teacher_prompt_ids.items()},
                   route=by_id[r.request_id].record.route,
                   gold_prefix_length=by_id[r.request_id].record.gold_prefix_length)
            for r in responses]


def run_rollout(config, inputs) -> None:
    """The rollout stage's call (`inputs`: its StageInputs, with the engine and the tokenizer it bound)."""
    run, values, engine = inputs.run, inputs.values, inputs.models["engine"]
    facts, device = run.facts, run.device
    params = sampling_params(config, max_new_tokens=config.max_new_tokens, greedy=config.greedy,
                             eos_token_ids=inputs.models["tokenizer"].eos_token_ids)
    prompts, sft = values.get("prompts"), facts.get("sft")
    if sft is not None:
        prompts = with_gold_prefix(prompts, sft.prefix_schedule(), run.step)
    samples = generate_samples(engine, prompts, params, n=facts["samples_per_prompt"],
                               seed=run.seed, step=run.step, tag="step")
    stats = engine.stats
    lengths = [len(s.response_ids) for s in samples]
    # Normalisation counts are global over the step's batch: summed over ranks, so every rank weights its tokens as
    # one process holding the whole batch would. The logged counts are global too.
    # The sft stage's (gold-prefix tokens, sequences with a prefix) ride in the same all-reduce.
    gold = [] if sft is None else [sum(s.gold_prefix_length for s in samples),
                                   sum(s.gold_prefix_length > 0 for s in samples)]
    totals = all_reduce_sum([sum(lengths), len(samples), sum(s.finish_reason != "length" for s in samples),
                             stats.preemptions, stats.tokens_per_second, *gold], device)
    global_tokens, global_sequences, finished_by_eos, preemptions = (int(v) for v in totals[:4])
    gold_counts = (sft.normalize, int(totals[5]), int(totals[6])) if sft is not None else ("token", 0, 0)
    micro_batches = build_micro_batches(samples, budgets=facts["micro_batch_budgets"],
                                        normalize=facts["normalize"], global_tokens=global_tokens,
                                        global_sequences=global_sequences, device=device,
                                        route_groups=facts.get("route_groups"),
                                        group_order=facts.get("group_order", ("",)), gold=gold_counts)
    micro_batches = pad_micro_batches(micro_batches, device)
    values.put("responses", RolloutBatch(samples, micro_batches))
    run.last_samples = samples[:4]
    values.put(f"{inputs.step.stage}.kv_cache", engine.kv_cache)
    run.record.update({
        "response_length_mean": global_tokens / global_sequences,
        "response_length_max": all_reduce_max(max(lengths), device),
        "response_tokens": global_tokens, "rollout_tokens_per_s": totals[4],
        "rollout_preemptions": preemptions, "finished_by_eos": finished_by_eos,
        "num_micro_batches": len(micro_batches),
    })
    if sft is not None:
        run.record.update({"gold_prefix_tokens": gold_counts[1],
                           "gold_prefix_length_mean": gold_counts[1] / global_sequences})
