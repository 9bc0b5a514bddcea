"""opdgraph: a declarative pipeline compiler for on-policy distillation (OPD) of LLMs.

Data flows one way: TOML -> typed config -> stage graph -> plan (steps, buffers, lifetimes) -> runtime.
The compiler core (config, graph, plan, lifetime, rendering) imports no torch.
"""

__version__ = "0.1.0"
