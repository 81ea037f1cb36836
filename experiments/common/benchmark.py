"""The interface every embedded benchmark implements, so each stage notebook is the same for all of them.

A benchmark is a module ``experiments.<name>`` with a ``BENCHMARK`` object of a :class:`Benchmark` subclass:

* ``validate(section)``: check its params section (raise :class:`ParamsError` naming the full key);
* ``teacher(ctx)``, ``distill(ctx)``, ``evaluate(ctx)``, ``figures(ctx)``: the four stages. Each does the work
  through ``sidlib``, writes its outputs under ``ctx.paths`` and returns a :class:`StageResult` for the notebook
  to show (tables, figures, text).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable, Sequence

from .parallel import run_parallel
from .params import Paths

__all__ = ["BENCHMARKS", "Benchmark", "Context", "StageResult", "get_benchmark"]

#: Embedded benchmark name -> module holding its ``BENCHMARK``.
BENCHMARKS = {"toy2d": "experiments.toy2d", "digits": "experiments.digits"}


@dataclass
class Context:
    """What a stage needs: the benchmark's (validated) params section, the ``run`` block and output paths."""

    name: str
    section: dict
    run: dict
    paths: Paths

    @property
    def checkpoints(self):
        return self.paths.checkpoints / self.name

    def parallel(self, fn: Callable, jobs: Sequence[dict]) -> list:
        return run_parallel(fn, jobs, workers=int(self.run.get("workers", 2)),
                            threads_per_worker=int(self.run.get("threads_per_worker", 1)))


@dataclass
class StageResult:
    """What a stage shows: a Markdown summary, tables (title -> Markdown) and figures (name -> PNG path)."""

    text: str = ""
    tables: dict = field(default_factory=dict)
    figures: dict = field(default_factory=dict)

    def _ipython_display_(self):  # rendered when a notebook cell ends with a StageResult
        from IPython.display import Image, Markdown, display

        if self.text:
            display(Markdown(self.text))
        for title, md in self.tables.items():
            display(Markdown(f"**{title}**\n\n{md}"))
        for name, path in self.figures.items():
            display(Markdown(f"`{name}`"), Image(filename=str(path)))


class Benchmark:
    """Base class: a benchmark's name, a description per stage, and the five functions above."""

    name = ""
    #: Markdown shown by the stage notebooks above their results: stage -> text.
    about: dict = {}

    def validate(self, section: dict) -> None:
        raise NotImplementedError

    def teacher(self, ctx: Context) -> StageResult:
        raise NotImplementedError

    def distill(self, ctx: Context) -> StageResult:
        raise NotImplementedError

    def evaluate(self, ctx: Context) -> StageResult:
        raise NotImplementedError

    def figures(self, ctx: Context) -> StageResult:
        raise NotImplementedError


def get_benchmark(name: str) -> Benchmark:
    """The ``BENCHMARK`` of an embedded benchmark; unknown names raise naming the known ones."""
    from .params import ParamsError

    if name not in BENCHMARKS:
        raise ParamsError(f"unknown benchmark {name!r}; embedded benchmarks: {sorted(BENCHMARKS)}")
    return importlib.import_module(BENCHMARKS[name]).BENCHMARK
