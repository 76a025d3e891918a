"""Benchmarks for docs/architecture.md §Targets, each runnable with one command.

``python -m bench.statistics``    aggregation vs a naive per-child loop (>= 100x)
``python -m bench.read``          40 granules behind 30 ms of S3 latency, concurrent vs
                                  one at a time (>= 8x); bytes vs chunks (<= 1.5x)
``python -m bench.orchestration`` 2,000 no-op cells through a real Prefect server (<= 30 ms/cell)
``python -m bench.memory``        peak RSS of one 5M-point cell (<= 1 GB)
``python -m bench.end_to_end``    the demo workload, with and without the latency proxy
``python -m bench.levels``        a cell's time and the store's bytes with levels 6..12 vs order 12
``python -m bench``               all of the above

Every script takes ``--quick`` (tiny inputs, for the smoke test) and prints one
``ratio`` line per measured target, so numbers that are compared are always
measured in the same run on the same machine.
"""
