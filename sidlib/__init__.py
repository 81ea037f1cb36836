"""sidlib: Score identity Distillation (SiD) of EDM diffusion models into one-step generators.

``networks`` (EDM's preconditioning and U-Nets), ``losses`` and ``sid_loss`` (EDM's and SiD's losses), ``distill``
(the SiD loop, CLI, torchrun), ``sampling`` and ``rng`` (samplers, named random streams), ``augment`` and ``ema``,
``io`` (checkpoints, downloads, logs), ``metrics`` (torch-fidelity, the paper's FID protocol), ``distributed``.
"""

__version__ = "0.2.0"

__all__ = ["load_network", "__version__"]


def load_network(source, **kwargs):
    """Load an EDM teacher, a released SiD generator or a sidlib checkpoint; see :func:`sidlib.io.checkpoints.load_network`."""
    from .io.checkpoints import load_network as _load

    return _load(source, **kwargs)
