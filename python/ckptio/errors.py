"""ckptio's exceptions.

* :class:`CheckpointError` (a ``RuntimeError``): the file is malformed, truncated or hostile;
  the message names the file and the problem.
* :class:`UnsafeGlobalError` (also a ``pickle.UnpicklingError``, as torch raises): a
  weights-only load met a global that is not allowed.
* OS failures are ``OSError`` subclasses carrying ``errno`` and ``filename``.
"""

from __future__ import annotations

import pickle

from ._core import CheckpointError

__all__ = ["CheckpointError", "UnsafeGlobalError"]


class UnsafeGlobalError(CheckpointError, pickle.UnpicklingError):
    """A weights-only load refused a global named by the checkpoint; nothing was imported."""
