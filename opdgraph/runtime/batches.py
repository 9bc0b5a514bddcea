"""Rollout samples -> packed training micro-batches with the positions the loss trains on.

A sample is prompt + response, laid end to end with the other samples of its micro-batch (no padding). The loss
trains every position whose *next* token is a response token: for a sample with P prompt and R response tokens at
packed offset o, that is positions o+P-1 ... o+P+R-2, and the targets are the R response tokens (the EOS token
included when it was sampled). Prompt positions are never trained.

Micro-batches are filled greedily in sample order within every budget the plan sized one micro-batch by
(`budgets`: the student's tokens, the positions outside a gold prefix, the gold-prefix positions, each teacher
view's tokens; `sample_usage`): the plan bounds each as its sequences per micro-batch x one sequence's bound, so
short sequences packed beyond that count can never exceed what the plan holds for them, and the micro-batches are
never more than planned (a batch closes only when one more sequence would overflow a budget, which takes at
least the planned count). A sample never straddles two micro-batches (attention needs the whole sequence), so
one larger than a budget is an error naming it.
Routed rows (opdgraph.teachers) are grouped by teacher first: each micro-batch holds one teacher's rows, the
groups in the plan's loop order, and every micro-batch keeps its index over the whole step.

A teacher that sees another prompt (opdgraph.data.teacher_prompts) scores a packed view of its own
(`TeacherView`): each sample's teacher prompt + the same response, with the positions that predict the response
tokens, in the same order as the student's loss positions, so position i of both views predicts the same token.

Hybrid SFT + OPD (stages/sft.py): a sample's last `gold_prefix_length` prompt ids are a gold prefix. They stay on
the prompt side (never loss positions, never kept from the teacher); the positions predicting them are the
micro-batch's `gold_positions` (o+P-k-1 ... o+P-2 for k prefix tokens), with their targets and the sft weights
(`gold_weights`: position_weights over those positions, normalised over the step's global prefix tokens or
sequences). A micro-batch without any prefix token has None there.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from opdgraph.models.attention_metadata import PackedMetadata
from opdgraph.train.weights import position_weights


@dataclass
class Sample:
    """One sampled response to one prompt, with everything later stages need."""

    prompt_ids: list[int]
    response_ids: list[int]
    prompt_index: int  # index of the prompt within this step's global batch
    sample_index: int
    finish_reason: str = ""
    logprobs: list[float] = field(default_factory=list)
    answer: str | None = None
    teacher_prompt_ids: dict[str, list[int]] = field(default_factory=dict)  # teacher stage -> the prompt it sees
    route: str | None = None
    gold_prefix_length: int = 0  # the last prompt ids that are a gold prefix (hybrid SFT)


@dataclass
class PackedView:
    """Packed sequences and the positions whose next token is a response token."""

    input_ids: torch.Tensor  # long [T]
    positions: torch.Tensor  # long [T]
    meta: PackedMetadata
    loss_positions: torch.Tensor  # long [N]


@dataclass
class MicroBatch:
    input_ids: torch.Tensor  # long [T]
    positions: torch.Tensor  # long [T]
    meta: PackedMetadata
    loss_positions: torch.Tensor  # long [N], indices into the packed tokens
    target_ids: torch.Tensor  # long [N], the response token each loss position predicts
    weights: torch.Tensor  # fp32 [N], normalisation (token or sequence mean over the global batch)
    sample_of_position: torch.Tensor  # long [N], which sample of this micro-batch each loss position belongs to
    samples: list[Sample]
    index: int = 0  # over the step's micro-batches
    group: str = ""  # the teacher loop it belongs to ('' unless rows are routed)
    teacher_views: dict[str, PackedView] = field(default_factory=dict)  # teachers that see another prompt
    gold_positions: torch.Tensor | None = None  # long [M]: positions predicting a gold-prefix token (hybrid SFT)
    gold_targets: torch.Tensor | None = None  # long [M]: the gold token each predicts
    gold_weights: torch.Tensor | None = None  # fp32 [M]: the sft normalisation (stages/sft.py)

    def view_for(self, teacher_stage: str) -> "PackedView | MicroBatch":
        """What `teacher_stage` scores: its own view, or the student's sequences."""
        return self.teacher_views.get(teacher_stage, self)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())


def _packed(prompts: list[list[int]], responses: list[list[int]], device: torch.device) -> tuple[PackedView, list]:
    """Prompt + response sequences laid end to end, and the positions predicting each response token."""
    ids, positions, cu, loss_pos = [], [], [0], []
    for prompt, response in zip(prompts, responses):
        offset = cu[-1]
        ids.extend(prompt + response)
        positions.extend(range(len(prompt) + len(response)))
        cu.append(offset + len(prompt) + len(response))
        first = offset + len(prompt) - 1
        loss_pos.extend(range(first, first + len(response)))
    lengths = [b - a for a, b in zip(cu, cu[1:])]
    long = dict(dtype=torch.long, device=device)
    cu_seqlens = torch.tensor(cu, dtype=torch.int32, device=device)
    return PackedView(input_ids=torch.tensor(ids, **long), positions=torch.tensor(positions, **long),
                      meta=PackedMetadata(cu_seqlens=cu_seqlens, max_seqlen=max(lengths)),
                      loss_positions=torch.tensor(loss_pos, **long)), cu


def _gold(samples: list[Sample], cu: list[int], normalize: str, global_tokens: int, global_sequences: int,
          device: torch.device) -> dict:
    """The micro-batch's gold-prefix positions, targets and weights (module docstring), or nothing."""
    if not any(sample.gold_prefix_length for sample in samples):
        return {}
    positions, targets = [], []
    for sample, offset in zip(samples, cu):
        prompt, k = sample.prompt_ids, sample.gold_prefix_length
        positions.extend(range(offset + len(prompt) - k - 1, offset + len(prompt) - 1))
        targets.extend(prompt[len(prompt) - k:])
    long = dict(dtype=torch.long, device=device)
    gold_positions = torch.tensor(positions, **long)
    mask = torch.zeros(cu[-1], dtype=torch.bool, device=device).index_fill_(0, gold_positions, True)
    weights = position_weights(mask, torch.tensor(cu, dtype=torch.int32, device=device), normalize=normalize,
                               global_token_count=global_tokens, global_seq_count=global_sequences)
    return {"gold_positions": gold_positions, "gold_targets": torch.tensor(targets, **long),
            "gold_weights": weights.index_select(0, gold_positions)}


def _pack(samples: list[Sample], *, normalize: str, global_tokens: int, global_sequences: int,
          device: torch.device, index: int = 0, group: str = "", gold: tuple = ("token", 0, 0)) -> MicroBatch:
    responses = [sample.response_ids for sample in samples]
    view, cu = _packed([sample.prompt_ids for sample in samples], responses, device)
    long = dict(dtype=torch.long, device=device)
    targets = [token for response in responses for token in response]
    owner = [position for position, response in enumerate(responses) for _ in response]
    loss_mask = torch.zeros(cu[-1], dtype=torch.bool, device=device).index_fill_(0, view.loss_positions, True)
    weights = position_weights(loss_mask, view.meta.cu_seqlens, normalize=normalize,
                               global_token_count=global_tokens,
                               global_seq_count=global_sequences).index_select(0, view.loss_positions)
    teacher_views = {stage: _packed([sample.teacher_prompt_ids[stage] for sample in samples], responses, device)[0]
                     for stage in (samples[0].teacher_prompt_ids if samples else {})}
    return MicroBatch(
        input_ids=view.input_ids,
        positions=view.positions,
        meta=view.meta,
        loss_positions=view.loss_positions,
        target_ids=torch.tensor(targets, **long),
        weights=weights,
        sample_of_position=torch.tensor(owner, **long),
        samples=samples,
        index=index,
        group=group,
        teacher_views=teacher_views,
        **_gold(samples, cu, *gold, device),
    )


def build_micro_batches(samples: list[Sample], *, budgets: dict[str, int], normalize: str, global_tokens: int,
                        global_sequences: int, device: torch.device,
                        route_groups: dict[str, str] | None = None, group_order: tuple[str, ...] = ("",),
                        gold: tuple[str, int, int] = ("token", 0, 0)) -> list[MicroBatch]:
    """Pack samples greedily into micro-batches within `budgets` (module docstring; at least "tokens"); with
    `route_groups` (route value -> group name) each group's samples separately, in `group_order`. `gold`: the sft
    stage's normalize and the step's global gold-prefix tokens and sequences with a prefix (hybrid SFT)."""
    batches: list[MicroBatch] = []
    for group in group_order:
        members = [s for s in samples if route_groups is None or route_groups[s.route] == group]
        for members_of_batch in _greedy(members, budgets):
            batches.append(_pack(members_of_batch, normalize=normalize, global_tokens=global_tokens,
                                 global_sequences=global_sequences, device=device, index=len(batches),
                                 group=group, gold=gold))
    return batches


# Budget names -> the plan fact that sets each (for errors and for opdgraph.runtime.build).
BUDGET_FACTS = {"tokens": "train.micro_batch_tokens", "scored": "train.micro_batch_scored_tokens",
                "gold": "train.micro_batch_gold_tokens"}


def training_budgets(plan_facts: dict, teacher_stages) -> dict[str, int]:
    """A training micro-batch's budgets from the plan's facts: every one it sized (teachers: "teacher:<stage>")."""
    budgets = {name: int(plan_facts[fact]) for name, fact in BUDGET_FACTS.items() if fact in plan_facts}
    budgets.update({f"teacher:{stage}": int(plan_facts[f"{stage}.forward_tokens"]) for stage in teacher_stages})
    return budgets


def sample_usage(sample: Sample, budgets: dict[str, int]) -> dict[str, int]:
    """What `sample` takes of each budget: its tokens, those outside its gold prefix, its gold prefix, and the
    tokens of each teacher's view (the student's prompt where a teacher sees no other)."""
    tokens = len(sample.prompt_ids) + len(sample.response_ids)
    usage = {"tokens": tokens, "scored": tokens - sample.gold_prefix_length, "gold": sample.gold_prefix_length}
    for name in budgets:
        if name.startswith("teacher:"):
            prompt = sample.teacher_prompt_ids.get(name.removeprefix("teacher:"), sample.prompt_ids)
            usage[name] = len(prompt) + len(sample.response_ids)
    return {name: usage[name] for name in budgets}


def _greedy(samples: list[Sample], budgets: dict[str, int]) -> list[list[Sample]]:
    groups: list[list[Sample]] = []
    current: list[Sample] = []
    used = dict.fromkeys(budgets, 0)
    for sample in samples:
        usage = sample_usage(sample, budgets)
        for name, amount in usage.items():
            if amount > budgets[name]:
                raise ValueError(_too_large(sample, name, amount, budgets[name]))
        if current and any(used[name] + amount > budgets[name] for name, amount in usage.items()):
            groups.append(current)
            current, used = [], dict.fromkeys(budgets, 0)
        current.append(sample)
        used = {name: used[name] + amount for name, amount in usage.items()}
    if current:
        groups.append(current)
    return groups


def _too_large(sample: Sample, name: str, amount: int, budget: int) -> str:
    if name == "tokens":
        return (f"a sample of {amount} tokens (prompt {len(sample.prompt_ids)} + response "
                f"{len(sample.response_ids)}) exceeds the plan's train.micro_batch_tokens = {budget} (its sequences "
                "per micro-batch x data.max_prompt_tokens + any gold prefix bound + max_new_tokens): a prompt or "
                "response longer than its limit; check those limits against the data")
    fact = BUDGET_FACTS.get(name, f"{name.removeprefix('teacher:')}.forward_tokens")
    return (f"a sample takes {amount} of the micro-batch budget {fact} = {budget} (the plan's bound per sequence "
            "is exceeded: a prompt longer than its max_prompt_tokens or a gold prefix longer than its maximum); "
            "check those settings against the data")
