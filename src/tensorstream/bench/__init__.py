"""Benchmarks as a product feature: ``tensorstream bench``.

- :mod:`~tensorstream.bench.runner`: the same pipeline on each framework variant
  (torch eager, torch.compile, tf.function, XLA), through the real broker, each
  run in its own process, one after another;
- :mod:`~tensorstream.bench.report`: ``report.md``, PNG plots, the rich summary;
- :mod:`~tensorstream.bench.verbosity`: lines of model and training code per framework;
- :mod:`~tensorstream.bench.machine`: cores, CPU, date and versions for every figure;
- :mod:`~tensorstream.bench.timed`: a ``Pipeline`` that notes when its batches were
  done (first prediction, steady rates in wall and CPU time), also used by ``benchmarks/``;
- :mod:`~tensorstream.bench.command`: the typer command, registered in ``tensorstream.cli``.

Importing this package imports no framework and no plotting library.
"""
