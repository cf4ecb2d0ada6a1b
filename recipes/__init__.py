"""Runnable experiments built on the public API of :mod:`hyperopt_torch`.

Run one as ``python -m recipes.<name> --help``.  Shared pieces live here once:
:mod:`recipes.common` (flags, outputs, checkpoints, progress, plots),
:mod:`recipes.data` (datasets) and :mod:`recipes.models` (networks).
"""
