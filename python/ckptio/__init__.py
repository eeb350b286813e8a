"""ckptio: fast, safe drop-in replacements for torch.save and torch.load.

>>> import ckptio
>>> ckptio.save(model.state_dict(), "model.pt")      # loads with stock torch.load too
>>> state = ckptio.load("model.pt")                   # weights-only by default
>>> state = ckptio.load("model.pt", mmap=True)        # zero-copy views of the file
>>> ckptio.load_into(model, "model.pt")               # in place, into existing tensors
"""

from __future__ import annotations

try:
    from . import _core  # noqa: F401  (fail early with a clear message)
except ImportError as _e:  # pragma: no cover - depends on the installation
    raise ImportError(
        "ckptio's native extension (ckptio._core) is missing or failed to load. Install ckptio "
        "with `pip install .` from a source checkout (it needs a C++17 compiler and CMake), or "
        f"install a wheel for this platform. Original error: {_e}"
    ) from _e

from ._load_into import IncompatibleKeys, load_into
from .errors import CheckpointError, UnsafeGlobalError
from .serialization import load, save
from .settings import Options, get_options, options, set_options

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "IncompatibleKeys",
    "Options",
    "UnsafeGlobalError",
    "get_options",
    "load",
    "load_into",
    "options",
    "save",
    "set_options",
]
