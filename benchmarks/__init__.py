"""Throughput benchmarks of buzzdask on generated field-recording-like corpora.

``python -m benchmarks`` builds (or reuses) three corpora of generated recordings (MP3s, 1-hour
WAVs, many 30-second WAVs), then measures on each, in interleaved rounds: a sequential
single-process analyzer, the decode stage alone, the model stage alone, both stages at once
without Dask, and ``buzzdask.analyze`` on a local cluster. It writes a JSON record and a plot
under ``benchmarks/results/``. See the README's "Performance" section.

Modules: :mod:`benchmarks.corpus` (generated recordings, cached), :mod:`benchmarks.stages`
(each measured configuration, run in its own process), :mod:`benchmarks.corun` (both stages at
once: the co-run bound), :mod:`benchmarks.analyze_stage` (``buzzdask.analyze``),
:mod:`benchmarks.cpu_split` (a cluster's CPU time per process and thread),
:mod:`benchmarks.measure` (runs a stage and samples its process tree's memory),
:mod:`benchmarks.outputs` (activations checked against the baseline's),
:mod:`benchmarks.summary` (bounds and targets over the rounds), :mod:`benchmarks.record` (the
JSON record) and :mod:`benchmarks.report` (machine description, tables, plot).

Other runs: ``python -m benchmarks.heads`` (several heads in one run, re-scoring an embedding
store, float16 and the store's size), ``python -m benchmarks.long_files`` (single very long
files) and ``benchmarks/device-check`` (a GPU).
"""
