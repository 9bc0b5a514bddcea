"""The fp32 gradient accumulators' fold hooks end with their run: a model reused by a second run (the step
benchmark's variants) gets its gradients folded into the second run's buffer, not stolen by the first run's hooks."""

import torch

from opdgraph.runtime.buffers import BufferTable
from opdgraph.runtime.gradients import StudentGradients


class OneMatrix(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(3, 4, dtype=torch.float64))
        self.lm_head_weight = self.weight


def test_a_second_run_on_the_same_model_gets_its_own_gradients():
    """If this fails, a closed run's post-accumulate hooks still fire: they take the gradient (param.grad = None)
    into a buffer that run has released, so the next run's accumulator stays zero or the step raises."""
    model = OneMatrix()
    scale = torch.randn(3, 4, dtype=torch.float64)
    for _ in range(2):
        buffers = BufferTable(debug=False)
        gradients = StudentGradients(model, buffers, "student.grads", fp32=True)
        gradients.accumulators()
        (model.weight * scale).sum().backward()
        folded = buffers.get("student.grads")["weight"]
        assert torch.equal(folded, scale.float()), "the gradient was not folded into this run's accumulator"
        gradients.close()
