"""Side-by-side benchmarks of dspool against ProcessPoolExecutor, loky, ipyparallel, Dask.

Run ``python -m bench`` (``--help`` for options); definitions are in ``bench/README.md``.
"""
