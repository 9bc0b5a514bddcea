"""Which teacher an eval row belongs to, and bringing teachers' weights onto the device for eval.

Shared by eval's answering (opdgraph.runtime.eval_answers) and scoring (opdgraph.runtime.evaluation): with routed
teachers (loss.route_field with several teachers) each row is answered and scored by the teacher its route field
names, as in training; otherwise by the first teacher (plan order). An offloading plan keeps the teachers' weights on
the host outside teacher scoring, so eval brings the teachers it uses in for its turn and back out after.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager


def _teachers(inputs) -> list:
    """The teacher stages (TeacherRuntime), in plan order."""
    return list(inputs.models["teachers"].values())


def _routed(inputs) -> bool:
    """Each row has a teacher of its own (loss.route_field with several teachers)."""
    return len(inputs.models["teachers"]) > 1 and "route_groups" in inputs.run.facts


def _teacher_of(inputs, record):
    """The teacher that answers and scores a row: its routed one, else the first."""
    teachers = _teachers(inputs)
    if not _routed(inputs):
        return teachers[0]
    return next(teacher for teacher in teachers if record.route in teacher.spec.routes)


@contextmanager
def _on_device(inputs, teachers: list):
    """Eval runs outside teacher scoring, where an offloading plan keeps the teachers' weights on the host: bring
    `teachers` in (a sharded teacher is gathered), and back out after."""
    offloader = inputs.models["offloader"]
    swaps = [offloader.swap_for(teacher.weights_buffer) for teacher in teachers] if offloader is not None else []
    with ExitStack() as stack:
        for swap in dict.fromkeys(swap for swap in swaps if swap is not None):
            swap.to_device()
            stack.callback(swap.to_host)
        yield
