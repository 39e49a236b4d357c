"""What the three benchmarks share.

``bench_suite.py``, ``bench_save_memory.py`` and ``bench_load.py`` each put ``benchmarks/`` first on
``sys.path`` (Python does that for a script), so they import this package as ``common``:

* ``proc``: Linux ``/proc`` probes of one process (RSS, ``VmHWM``, ``RssAnon``, I/O, CPU time);
* ``state``: the synthetic GPT-shaped float32 state and a zero-filled model to load it into;
* ``servers``: moto (S3) and the GCS emulator on 127.0.0.1 in the parent process;
* ``counting``: server-side request and byte counting around those servers;
* ``child``: one measurement in a fresh interpreter;
* ``provenance``: command line, date, machine, versions and ckptstore revision of a run;
* ``results_md``: replace one benchmark's ``## ...`` section of ``RESULTS.md``.
"""
