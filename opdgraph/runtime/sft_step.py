"""The sft stage at run time (hybrid SFT + OPD, stages/sft.py): one micro-batch's cross-entropy on its gold-prefix
positions, between the loss and the backward of the fused loop.

It reads the student's hidden states at the prefix positions from the forward the loss stage ran (its graph is kept
in `student_activations` for the backward; the cross-entropy works on a detached copy, `<stage>.student_hidden`),
computes the term and its analytic gradients (opdgraph.train.sft_loss: the lm_head's into the step's gradient
accumulators, the hidden states' into `<stage>.hidden_grad`, which the backward scatters to the prefix positions
beside the divergence's). A micro-batch without prefix tokens writes an empty gradient. Sums for the step record
stay device tensors (read back once, by the optimizer step).
"""

from __future__ import annotations

import torch


def sft_cross_entropy(config, inputs) -> None:
    """The stage's call (`inputs`: its StageInputs, with the student and the gradients it bound)."""
    from opdgraph.train.sft_loss import chunked_cross_entropy

    loop, values, stage, record = inputs.loop, inputs.values, inputs.step.stage, inputs.run.record
    batch = loop.micro_batch
    activations = values.get_item(loop.local("student_activations"), batch.index)
    if batch.gold_positions is None:  # still summed into the record: every rank reports the same keys
        values.put_item(loop.local(f"{stage}.hidden_grad"), batch.index,
                        activations.new_zeros((0, activations.shape[1])))
        _add(record, torch.zeros((), device=activations.device), torch.zeros((), device=activations.device))
        return
    hidden = activations.detach().index_select(0, batch.gold_positions)
    values.put_item(loop.local(f"{stage}.student_hidden"), batch.index, hidden)
    result = chunked_cross_entropy(hidden, inputs.models["student"].lm_head_weight.detach(), batch.gold_targets,
                                   batch.gold_weights, scale=config.weight, chunk_tokens=config.chunk_tokens,
                                   lm_head_grad=inputs.models["gradients"].lm_head())
    values.put_item(loop.local(f"{stage}.hidden_grad"), batch.index, result.hidden_grad)
    _add(record, result.loss, torch.dot(batch.gold_weights, result.per_token))


def _add(record: dict, loss: torch.Tensor, cross_entropy: torch.Tensor) -> None:
    """`sft_loss` (weight x the normalised CE, the term added to the objective) and `sft_cross_entropy` (the
    normalised CE itself: the mean per gold-prefix token with normalize = "token")."""
    for key, value in (("sft_loss", loss), ("sft_cross_entropy", cross_entropy)):
        record[key] = value if key not in record else record[key] + value
