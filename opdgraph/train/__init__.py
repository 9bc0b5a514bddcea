"""Training math of OPD in plain torch (device-agnostic; Triton kernels in opdgraph.kernels replace hot parts).

- ``weights``:    per-position loss weights (token / sequence normalisation) from the packed layout.
- ``losses``:     per-chunk divergence math: raw logits -> (weighted loss, analytic dlogits, per-token values).
- ``divergence``: chunked full-vocab divergences over N positions (the loss stage), and eval metrics.
- ``two_stage``:  finish the student backward from the chunked loss's hidden and lm_head gradients.
- ``optimizer``:  AdamW with fp32 master weights, global-norm gradient clipping.
- ``schedule``:   learning-rate schedules (warmup, constant / cosine / linear decay).
- ``sft_loss``:   chunked token cross-entropy with its analytic gradient (the sft stage, hybrid SFT + OPD).
- ``prefix_schedule``: the gold prefix's length per row and step (torch-free).
"""
