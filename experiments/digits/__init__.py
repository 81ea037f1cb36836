"""digits: SiD on scikit-learn's 8x8 digits with EDM teachers trained here (:mod:`.data`, :mod:`.classifier`,
:mod:`.metrics`, :mod:`.bench`, :mod:`.plots`)."""

from .bench import BENCHMARK

__all__ = ["BENCHMARK"]
