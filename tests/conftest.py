"""Test-session setup, before any test module is imported.

- Without CUDA, Triton kernels run in the CPU interpreter: TRITON_INTERPRET=1 is set here (as each kernel test
  module also does), because it must be set before triton is first imported, and the import below brings triton in.
- transformers' Qwen3.5 reference runs its plain-torch path even where fla is installed: transformers binds
  flash-linear-attention's Triton kernels into its Qwen3.5 model at import time whenever `fla` imports, for every
  device, CPU tensors included (where they cannot run), and the parity tests compare our model with transformers'
  torch reference. So, where fla is installed, that modeling module is imported once here with fla hidden (an
  ImportError for it, as if it were absent); our own fla core (kernels/fla_linear_attention.py) imports fla
  normally afterwards.
"""

import importlib.util
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

if importlib.util.find_spec("fla") is not None and "transformers.models.qwen3_5.modeling_qwen3_5" not in sys.modules:
    hidden = {name: sys.modules.pop(name) for name in list(sys.modules) if name == "fla" or name.startswith("fla.")}
    sys.modules["fla"] = None  # `import fla` raises ImportError while this is set
    try:
        import transformers.models.qwen3_5.modeling_qwen3_5  # noqa: F401
    finally:
        del sys.modules["fla"]
        sys.modules.update(hidden)
