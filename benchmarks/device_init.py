"""Benchmarks only: draw random model weights on the GPU instead of the CPU (minutes saved for billions of
parameters; the speed of a step does not depend on the values)."""

import torch


def use_device_side_init() -> None:
    """Random init drawn on the model's device. DecoderLM.reset_parameters draws on the CPU so that weights do not
    depend on the device, which takes minutes for 9B parameters; the step's speed does not depend on the values.
    Same distribution: normal(0, initializer_range) matrices and embeddings, zero biases, norms reset."""
    from opdgraph.models.decoder import DecoderLM
    from opdgraph.models.layers import RMSNorm

    @torch.no_grad()
    def reset_parameters(self, seed: int) -> None:
        generator = torch.Generator(device=self.device).manual_seed(seed)
        for name, parameter in self.named_parameters():
            if isinstance(self.get_submodule(name.rsplit(".", 1)[0]), RMSNorm):
                continue
            if name.endswith(".bias"):
                parameter.zero_()
            else:
                parameter.normal_(0.0, self.config.initializer_range, generator=generator)
        for module in self.modules():
            if isinstance(module, RMSNorm):
                module.reset_parameters()

    DecoderLM.reset_parameters = reset_parameters
