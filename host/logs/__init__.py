"""Tuning logs, and the one place that knows their format.

- :mod:`.format`: the file names, the one JSON-lines reading policy, the failed-trial rule, the session
  :class:`~.format.Status`, the workload hash, the typed history line (:class:`~.format.Trial`);
- :mod:`.tuninglog`: a log folder opened for reading (never writes) or for writing (one writer, flock);
- :mod:`.results`: the typed per-task result (:class:`~.results.TaskResult`), the GFLOPS formula, the
  estimated model latency and the one table of results;
- :mod:`.decisions`: what a record's trace decided, in people's words;
- :mod:`.ops` and :mod:`.command`: `edgetune log show|merge|export`.
"""
