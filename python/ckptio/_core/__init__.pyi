# Stubs of the native extension ckptio._core (csrc/bindings/module.cpp), split by area into
# submodules: io (files, parallel I/O, mappings, host memory), zip (the container) and
# pickling (the pickle pre-scan and the C fast paths of the pickler and unpicklers).
from __future__ import annotations

from . import io as io
from . import pickling as pickling
from . import zip as zip

class CheckpointError(RuntimeError): ...
