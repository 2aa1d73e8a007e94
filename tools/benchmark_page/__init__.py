"""The pieces of tools/plot_benchmarks.py: the benchmark log's rows (``records``), what their
names mean and the goals (``labels``), how cells are written (``cells``), the three figures
(``figures``), and the markdown of docs/benchmarks.md (``page``, which puts together the tables
of ``engine_tables``, ``device_tables``, ``scale_tables``, ``goals``, ``fp8_tables`` and
``profiles``). Standard library and matplotlib only; nothing of gpuengine is imported."""
