"""The experiment harness of selftune: grids of runs (``bench``), their results files, and the
statistics and reports made from them (``report``, ``stats``).

A layer above the library: it starts runs as ``selftune train`` / ``selftune bam`` processes,
reads their run folders, and uses the library's public functions; nothing in ``selftune``
imports it, except the command line, which offers its ``bench`` and ``report`` commands.
"""
