"""Throughput benchmarks of buzzdask on a generated field-recording-like corpus.

``python -m benchmarks`` builds (or reuses) a corpus of generated recordings, then measures on
it, side by side in one run: a sequential single-process analyzer, the decode stage alone, the
model stage alone and ``buzzdask.analyze`` on a local cluster. It writes a JSON record and a
plot under ``benchmarks/results/``. See the README's "Performance" section.

Modules: :mod:`benchmarks.corpus` (generated recordings, cached), :mod:`benchmarks.stages`
(each measured configuration, run in its own process), :mod:`benchmarks.measure` (runs a stage
and samples its memory), :mod:`benchmarks.report` (machine description, JSON, plot).
"""
