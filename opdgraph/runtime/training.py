"""The training side of one OPD step, as the functions the stage modules call: teacher scoring, the student forward,
the chunked loss, the two-stage backward and the optimizer step.

Two-stage backward: the student backbone runs forward once per micro-batch and keeps its graph
(`student_activations`); the loss then works on the *detached* final hidden states at the trained positions
(`student_hidden`) in fixed chunks (logits of one chunk at a time, never [tokens x vocab]), producing dLoss/dhidden
(`hidden_grad`) and the lm_head gradient analytically; then one backward through the backbone with that gradient.
The gradients of the step's micro-batches are summed in `<student>.grads` (opdgraph.runtime.gradients: fp32
accumulators by default; the lm_head's analytic gradient joins the lm_head's, for tied embeddings the embedding's).
The optimizer step skips a step whose gradient norm or update is not finite (the record says which; see
opdgraph.runtime.skipped_steps for when skips stop the run).

No host synchronisation inside the micro-batch loop: loss and divergence are summed as device tensors in the step
record and read back once, by the optimizer step (which reads the gradient norm anyway).

Each function takes the StageInputs of its stage's call (opdgraph.runtime.stage_inputs): the models the stage bound
(`models`), the plan buffers it declares (`values`), the loop iteration and the run's services.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def teacher_score(inputs) -> None:
    """The teacher stage (`models["teacher"]`, a TeacherRuntime) scores the micro-batch: its own prompt view where it
    has one; a routed teacher only its own rows' micro-batches (an unfused plan's teacher loops run over all)."""
    batch, teacher = inputs.loop.micro_batch, inputs.models["teacher"]
    if batch.group and teacher.spec.group != batch.group:
        return
    view = batch.view_for(teacher.spec.stage)
    hidden = teacher.model.forward_hidden(view.input_ids, view.positions, view.meta)
    inputs.values.put_item(teacher.spec.hidden, batch.index, hidden.index_select(0, view.loss_positions))


def student_forward(inputs, *, keep_graph: bool, write_hidden: bool) -> None:
    """Student final hidden states; with the graph kept (`student_activations`) for the backward."""
    batch, loop, student = inputs.loop.micro_batch, inputs.loop, inputs.models["student"]
    with torch.set_grad_enabled(keep_graph):
        hidden = student.forward_hidden(batch.input_ids, batch.positions, batch.meta,
                                        activation_checkpointing=inputs.run.facts["activation_checkpointing"])
    if keep_graph:
        inputs.values.put_item(loop.local("student_activations"), batch.index, hidden)
    if write_hidden:
        inputs.values.put_item(loop.local("student_hidden"), batch.index,
                               hidden.detach().index_select(0, batch.loss_positions))


def check_loss_kernel(kernel: str, device, where: str = "loss.kernel") -> None:
    """Raises DeviceError when the loss kernel asked for cannot run on `device` (a torch.device or its name): call it
    at startup, before the weights load, so the run does not fail at its first loss."""
    from opdgraph.errors import DeviceError
    from opdgraph.kernels.divergence import triton_available

    if kernel != "triton":
        return
    device = torch.device(device)
    if device.type != "cuda":
        raise DeviceError(f"{where} = 'triton' needs a CUDA device, but this run is on {device.type}; set {where} "
                          f"= 'auto' or 'torch'")
    if not triton_available():
        raise DeviceError(f"{where} = 'triton' needs triton, which does not import here (pip install triton); set "
                          f"{where} = 'auto' or 'torch'")


def _use_triton(kernel: str, device: torch.device) -> bool:
    if kernel == "torch":
        return False
    from opdgraph.kernels.divergence import triton_available

    check_loss_kernel(kernel, device)
    return device.type == "cuda" and triton_available()


def _batch_teachers(teachers: dict, batch) -> list:
    """The teachers the loss takes on this micro-batch: a routed row's one, else every teacher (a mixture)."""
    if batch.group:
        return [teacher for teacher in teachers.values() if teacher.spec.group == batch.group]
    return list(teachers.values())


def chunked_loss(config, inputs) -> None:
    """The divergence of the micro-batch against its teachers (`models["teachers"]`, every teacher stage): a routed
    micro-batch's one, or the mixture of all; with a mixture also each teacher's divergence, for the log."""
    batch, loop, values, record = inputs.loop.micro_batch, inputs.loop, inputs.values, inputs.run.record
    student, every_teacher = inputs.models["student"], inputs.models["teachers"]
    hidden = values.get_item(loop.local("student_hidden"), batch.index)
    teachers = _batch_teachers(every_teacher, batch)
    teacher_hidden = [values.get_item(teacher.spec.hidden, batch.index) for teacher in teachers]
    teacher_heads = [teacher.model.lm_head_weight.detach() for teacher in teachers]
    mixture = len(teachers) > 1
    lm_head_grad = inputs.models["gradients"].lm_head()
    args = (hidden, student.lm_head_weight.detach(), teacher_hidden if mixture else teacher_hidden[0],
            teacher_heads if mixture else teacher_heads[0], batch.weights)
    common = dict(divergence=config.divergence, beta=config.beta, temperature=config.temperature,
                  chunk_tokens=config.chunk_tokens, lm_head_grad=lm_head_grad,
                  sampled_ids=batch.target_ids if config.divergence == "sampled_token" else None)
    if mixture:
        common.update(mixture_weights=[teacher.spec.mixture_weight for teacher in teachers], per_teacher=True)
    if not mixture and _use_triton(config.kernel, hidden.device):
        from opdgraph.kernels.divergence import chunked_fused_divergence

        # The bf16 gradient is written into the fp32 student-logit rows in place: exact, 2 bytes per logit less
        # (measured on an H200 in benchmarks/results/divergence_h200_variants.txt).
        loss, hidden_grad, per_token = chunked_fused_divergence(*args, **common, grad_in_student_logits=True)
        estimate = (per_token * batch.weights).sum()
    else:
        from opdgraph.train.divergence import chunked_divergence

        result = chunked_divergence(*args, **common)
        loss, hidden_grad, estimate = result.loss, result.hidden_grad, result.estimate
    values.put_item(loop.local("hidden_grad"), batch.index, hidden_grad)
    sums = [("loss", loss), ("divergence", estimate)]
    if len(every_teacher) > 1 and not mixture:  # routed: each teacher's share, made a mean over its tokens later
        stage = teachers[0].spec.stage
        sums += [(f"divergence[{stage}]", estimate), (f"{TEACHER_WEIGHT}[{stage}]", batch.weights.sum())]
    if mixture:  # every row is scored by every teacher: each one's weighted sum is its mean over the step's tokens
        sums += [(f"divergence[{teacher.spec.stage}]", each)
                 for teacher, each in zip(teachers, result.per_teacher_estimates)]
    for key, value in sums:
        value = value.detach()
        record[key] = value if key not in record else record[key] + value


TEACHER_WEIGHT = "_teacher_weight"  # a routed teacher's summed position weights (never logged)


def read_back_step_scalars(record: dict) -> None:
    """Device tensors gathered during the step -> python floats (the step's one read-back). A routed teacher's
    `divergence[<stage>]` becomes the mean over its own rows' tokens (its weighted sum / its weights' sum)."""
    for key, value in record.items():
        if isinstance(value, torch.Tensor):
            record[key] = float(value)
    for key in [key for key in record if key.startswith(TEACHER_WEIGHT)]:
        weight = record.pop(key)
        stage_key = "divergence" + key[len(TEACHER_WEIGHT):]
        record[stage_key] = record[stage_key] / weight if weight else None


def backward(inputs) -> None:
    """Second stage: one backward with the hidden-state gradient scattered to the trained rows."""
    batch, loop = inputs.loop.micro_batch, inputs.loop
    if inputs.run.facts.get("gather_per_step"):
        from opdgraph.runtime.fsdp import sync_gradients_if_last

        sync_gradients_if_last(inputs.models["student"], loop.index, loop.count)
    activations = inputs.values.get_item(loop.local("student_activations"), batch.index)
    hidden_grad = inputs.values.get_item(loop.local("hidden_grad"), batch.index)
    full_grad = torch.zeros_like(activations)
    full_grad.index_copy_(0, batch.loss_positions, hidden_grad.to(activations.dtype))
    for name in inputs.run.facts.get("sft_hidden_grads", ()):  # hybrid SFT: the gold prefix's rows (disjoint)
        if batch.gold_positions is not None:
            full_grad.index_copy_(0, batch.gold_positions,
                                  inputs.values.get_item(loop.local(name), batch.index).to(activations.dtype))
    activations.backward(full_grad)


def optimizer_step(config, inputs, *, stage: str = "step") -> None:
    """Clip and apply AdamW on fp32 masters; a step whose gradient norm or update is not finite changes nothing and
    is logged (`skipped` names the reason); `stage` names the step stage in what a stopped run prints."""
    from opdgraph.train.grad_clipping import clip_grad_norm
    from opdgraph.train.schedule import lr_at

    from opdgraph.runtime.skipped_steps import NON_FINITE_GRADIENT, NON_FINITE_UPDATE

    run, gradients, optimizer = inputs.run, inputs.models["gradients"], inputs.models["optimizer"]
    grads = gradients.finish()  # the lm_head gradient added (summed over ranks when sharded)
    norm, finite = clip_grad_norm(grads.values(), config.max_grad_norm)
    read_back_step_scalars(run.record)
    lr = lr_at(run.step, base_lr=config.lr, warmup_steps=config.warmup_steps, total_steps=run.num_steps,
               schedule=config.schedule, min_lr_ratio=config.min_lr_ratio)
    skipped = None if finite else NON_FINITE_GRADIENT
    if skipped is None and not optimizer.step(lr, grads):
        skipped = NON_FINITE_UPDATE
    del grads
    run.record.update({"grad_norm": float(norm) if finite else None, "lr": lr, "skipped": skipped})
    if skipped is not None:
        print(f"step {run.step + 1}: {skipped}, update skipped (weights, fp32 masters and moments unchanged)")
    inputs.models["skipped_steps"].record(run.step + 1, skipped, config, stage)
    if run.facts["grads_held"]:  # the plan keeps the gradients for the run: next step accumulates into zeros
        gradients.zero()
    run.end_step()
