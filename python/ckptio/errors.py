"""ckptio's exceptions.

* :class:`CheckpointError` (a ``RuntimeError``): the file is malformed, truncated or hostile;
  the message names the file and the problem.
* :class:`UnsafeGlobalError` (also a ``pickle.UnpicklingError``, as torch raises): a
  weights-only load met a global that is not allowed. It names every global the file needs
  that the allowlist lacks (``.globals``), found by a pre-scan of the pickle, and the line
  that would allow them.
* OS failures are ``OSError`` subclasses carrying ``errno`` and ``filename``.
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence

from ._core import CheckpointError

__all__ = ["CheckpointError", "UnsafeGlobalError"]


class UnsafeGlobalError(CheckpointError, pickle.UnpicklingError):
    """A weights-only load refused a global named by the checkpoint; nothing was imported.

    Attributes:
        globals: the full names (``"argparse.Namespace"``) of every global the checkpoint
            needs that the weights-only allowlist lacks, in the order the pickle names them,
            the refused one included; those whose module is blocked included too.
        blocked: those of ``globals`` whose module (``os``, ``sys``...) no allowlist can
            enable.

    Example:
        >>> try:
        ...     ckptio.load("ckpt.pt")  # doctest: +SKIP
        ... except ckptio.UnsafeGlobalError as e:
        ...     print(e.globals)  # ['argparse.Namespace', 'numpy.core.multiarray.scalar']
    """

    def __init__(
        self, message: str, globals: Sequence[str] = (), blocked: Sequence[str] = ()
    ) -> None:
        super().__init__(message)
        self.globals: list[str] = list(globals)
        self.blocked: list[str] = list(blocked)


def unsafe_globals_message(needed: Sequence[str], blocked: Sequence[str] = ()) -> str:
    """The message of an UnsafeGlobalError for the globals `needed` (blocked ones included),
    with the ``add_safe_globals`` line and the ``safe_globals`` form that would allow the rest.
    """
    allowable = [g for g in needed if g not in blocked]
    names = ", ".join(allowable)
    parts = ["Weights only load failed:"]
    if allowable:
        parts.append(
            f"the checkpoint needs {len(allowable)} global"
            f"{'s' if len(allowable) > 1 else ''} that the weights-only allowlist lacks: "
            f"{names}. If you trust them, allow them with\n"
            f"    torch.serialization.add_safe_globals([{names}])\n"
            "or for one load with\n"
            f"    with torch.serialization.safe_globals([{names}]):\n"
            "(import each module first)."
        )
    for g in blocked:
        module = g.rpartition(".")[0]
        parts.append(
            f"the checkpoint names the global '{g}', whose module {module} is blocked; "
            "no allowlist can enable it."
        )
    parts.append(
        "If you trust the whole file, load it with weights_only=False (this can run "
        "arbitrary code)."
    )
    return " ".join(parts[:2]) + ("\n" + "\n".join(parts[2:]) if len(parts) > 2 else "")
