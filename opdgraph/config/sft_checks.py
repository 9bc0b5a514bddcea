"""Checks of a hybrid SFT + OPD pipeline (stages/sft.py) across its tables: one sft stage, the fused loop it runs in,
and room for prompt + gold prefix + continuation in the training micro-batch and in every model's positions.

The gold prefix sits on the prompt side of every sequence (up to data.max_prompt_tokens + gold_prefix_max_tokens
tokens before the continuation), so the limits the other checks apply to data.max_prompt_tokens + max_new_tokens
are checked here again with the prefix; a limit the plain check already reports is not reported twice.
"""

from __future__ import annotations


def check_sft_stages(pipeline, models, shapes, data, stages, problem, problems) -> None:
    from opdgraph.stages.sft import KIND  # the stage imports the config package: imported when called

    found = [name for name, stage in stages.items() if stage.kind == KIND]
    if not found:
        return
    name = found[0]
    for extra in found[1:]:
        problems.append(problem(extra, f"[{extra}] is a second sft stage beside [{name}]; a pipeline places one gold "
                                       f"prefix: keep one sft table"))
    config = stages[name].config
    if not pipeline.fuse_training:
        problems.append(problem("pipeline.fuse_training", (
            f"[{name}] trains in the fused micro-batch loop, on the student forward the loss runs; set "
            f"pipeline.fuse_training = true (the default) or remove [{name}]")))
    rollout = next((stage for stage in stages.values() if stage.kind == "rollout"), None)
    if rollout is None:
        return
    gold, new_tokens = config.gold_prefix_max_tokens, rollout.config.max_new_tokens
    plain = data.max_prompt_tokens + new_tokens
    needed = plain + gold
    where = f"{name}.gold_prefix_max_tokens"
    for scorer in (stage for stage in stages.values() if stage.kind == "teacher_score"):
        tokens = scorer.config.micro_batch_tokens
        if plain <= tokens < needed:
            problems.append(problem(f"{scorer.name}.micro_batch_tokens", (
                f"a micro-batch of {tokens} tokens cannot hold one whole sequence of data.max_prompt_tokens + "
                f"{where} + {rollout.name}.max_new_tokens = {needed} tokens; raise micro_batch_tokens to at "
                f"least {needed} (or lower {where} to at most {tokens - plain})")))
    evals = [stage for stage in stages.values() if stage.kind == "eval" and stage.config.max_new_tokens]
    longest = max([new_tokens, *(stage.config.max_new_tokens for stage in evals)])
    for model in models:
        limit = shapes[model].max_positions if model in shapes else 0
        if limit and data.max_prompt_tokens + longest <= limit < data.max_prompt_tokens + gold + longest:
            problems.append(problem(where, (
                f"data.max_prompt_tokens + {where} + the longest response ({longest} new tokens) = "
                f"{data.max_prompt_tokens + gold + longest} exceeds [models.{model}] max_position_embeddings "
                f"({limit}); lower {where} to at most {limit - data.max_prompt_tokens - longest}")))
    for scorer in (stage for stage in stages.values() if stage.kind == "teacher_score"):
        prompt_limit, model = scorer.config.max_prompt_tokens, scorer.config.model
        limit = shapes[model].max_positions if model in shapes else 0
        if prompt_limit and limit and prompt_limit + new_tokens <= limit < prompt_limit + gold + new_tokens:
            # The teacher scores its own prompt, then the gold prefix, then the continuation.
            problems.append(problem(where, (
                f"{scorer.name}.max_prompt_tokens + {where} + {rollout.name}.max_new_tokens = "
                f"{prompt_limit + gold + new_tokens} exceeds [models.{model}] max_position_embeddings ({limit}); "
                f"lower {where} to at most {limit - prompt_limit - new_tokens} or the teacher's max_prompt_tokens")))
