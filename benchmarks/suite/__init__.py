"""The benchmark suite: implementations x stores x operations x sizes, each cell in a fresh process.

The entry point is ``benchmarks/bench_suite.py`` (``cli.main``). One concept per module:

* ``stores``: the ``STORES`` registry (local disk, memory://, S3 on moto, GCS on its emulator);
* ``impls`` and ``limits``: the ``IMPLEMENTATIONS`` registry: stock peers, ckptstore, lower bounds;
* ``operations``: the ``OPERATIONS`` registry: save, full load, 10% partial load, convert (both ways);
* ``context``: ``Ctx``, the one argument every implementation function takes;
* ``measure``: a child process measuring one cell (time, peak RSS, bytes moved, correctness);
* ``runner``: starting those children (fork server or fresh interpreter);
* ``schedule``: the cells, their inputs, and the interleaved rounds;
* ``aggregate``, ``report``, ``charts``: medians and ratios, the RESULTS.md section, the PNGs;
* ``cli``: arguments, the JSON file, ``--append`` and ``--from-json``.

A new store or operation is one registry entry (and, for an operation, the functions of the
implementations that have it); everything else iterates the registries.
"""
