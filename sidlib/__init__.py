"""sidlib: Score identity Distillation (SiD) of EDM diffusion models into one-step generators.

Modules: ``networks`` (EDM's precondition wrappers and U-Nets), ``checkpoints`` (safe loading of EDM/SiD pickles and
our safetensors format), ``losses``, ``distill`` (the training loop, also under torchrun), ``sampling``, ``metrics``
and ``fid_protocol`` (torch-fidelity), ``presets`` and ``paper`` (the paper's runs, tables and figures), ``toy2d``
and ``digits`` (the embedded CPU benchmarks).
"""

__version__ = "0.1.0"
