"""Warnings that point at the user's line rather than at the library's."""

from __future__ import annotations

import os
import sys
import warnings

import torch

_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep
# torch's own wrappers around a step (an LR scheduler's, GradScaler.step) are not the user's line either
_SKIPPED = (_PACKAGE, os.path.dirname(os.path.abspath(torch.__file__)) + os.sep)


def warn(message: str, category: type[Warning]) -> None:
    """``warnings.warn`` attributed to the first caller outside ``hyperopt_torch`` and ``torch``.

    A fixed ``stacklevel`` is right for one call path only: the same warning
    reached through :meth:`HyperOptimizer.step <hyperopt_torch.HyperOptimizer.step>`
    and through :func:`~hyperopt_torch.implicit_hypergradient` sits at different
    depths, and pointing at the library's own line says nothing about which of
    the user's calls caused it (nor lets a ``warnings`` filter on the user's
    module match it).  torch's frames are skipped as well: with a scheduler
    attached, or through ``GradScaler.step``, ``HyperOptimizer.step`` is called
    by torch on the user's behalf.
    """
    level, frame = 2, sys._getframe(1)  # stacklevel 2 is warn()'s caller
    while frame is not None and frame.f_code.co_filename.startswith(_SKIPPED):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)
