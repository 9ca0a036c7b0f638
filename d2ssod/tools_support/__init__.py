"""What the command-line tools of ``tools/`` share with each other and with ``benchmarks/``:
training runs as subprocesses (:mod:`.training_runs`), the supervised / method / oracle
comparison of ``tools/compare.py`` and ``tools/demo.py`` (:mod:`.comparison`) and the plots of a
run's metrics (:mod:`.metrics_plots`). Nothing in the rest of the package imports it."""
