"""The experiments built on sidlib: the embedded benchmarks (:mod:`.toy2d`, :mod:`.digits`), the paper presets and
tables (:mod:`.paper`), and what the stages share (:mod:`.common`: params, runs, reports, figures). sidlib never
imports this package."""
