"""toy2d: SiD on a 2-D Gaussian mixture whose teacher is the exact denoiser (:mod:`.mixture`, :mod:`.metrics`,
:mod:`.bench`, :mod:`.plots`)."""

from .bench import BENCHMARK

__all__ = ["BENCHMARK"]
