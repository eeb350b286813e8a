"""Where loaded storages go: ``map_location``, resolved in one place for every reader.

``torch.load`` restores each storage with ``restore_location(storage, saved_location)``, built
from ``map_location`` (None, a str, bytes, a torch.device, a dict of locations, or a
callable). :class:`Placement` answers the questions ckptio's readers ask of it, memoised per
saved location (a file holds a handful):

* :attr:`Placement.is_meta`: nothing is read at all (``map_location="meta"``).
* :meth:`Placement.keeps_on_cpu`: restoring a CPU storage returns it unchanged, so it can be
  read straight into its final memory (None when only calling ``map_location`` can tell).
* :meth:`Placement.staged_target`: the storage goes to a CUDA device through the pinned
  staging ring (``_staging``) instead of pageable host memory and ``.to()``.
* :meth:`Placement.restore`: torch's own restore, for everything else.

A failure is torch's (it goes out as torch raises it: the caller's map_location callable, the
machine, or torch refusing a valid file for this host, such as a CUDA storage on a CPU-only
host) or the file's (a location naming no device: :class:`CheckpointError`).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from . import _staging
from ._util import is_environment_error, is_torch_refusal
from .errors import CheckpointError

__all__ = ["Placement", "is_meta"]

_UNKNOWN: Any = object()  # a memo's "not computed yet"


def is_meta(map_location: Any) -> bool:
    """Whether `map_location` sends every storage to the meta device."""
    if isinstance(map_location, (str, bytes)):
        loc = map_location.decode() if isinstance(map_location, bytes) else map_location
        return loc == "meta"
    return isinstance(map_location, torch.device) and map_location.type == "meta"


def _restore_target(map_location: Any, location: str) -> str | None:
    """The location torch's restore_location hands to default_restore_location for a storage
    saved at `location`, or None if only calling map_location can tell."""
    if map_location is None:
        target: Any = location
    elif isinstance(map_location, dict):
        target = map_location.get(location, location)
    elif isinstance(map_location, (str, bytes)):
        target = map_location
    elif isinstance(map_location, torch.device):
        target = str(map_location)
    else:
        return None
    if isinstance(target, bytes):
        target = target.decode() if isinstance(map_location, (str, bytes)) else None
    return target if isinstance(target, str) else None


def _is_user_code(map_location: Any) -> bool:
    return callable(map_location) and not isinstance(map_location, (str, bytes, dict, torch.device))


class Placement:
    """`map_location` of one load; `name` (the file) goes into error messages."""

    def __init__(self, map_location: Any, name: str) -> None:
        from torch.serialization import _get_restore_location

        self.map_location = map_location
        self.name = name
        self.is_meta = is_meta(map_location)
        self._restore: Callable[[Any, str], Any] = _get_restore_location(map_location)
        self._targets: dict[str, _staging.DeviceTarget | None] = {}  # by saved location
        self._devices: dict[str, _staging.DeviceTarget | None] = {}  # by restore target
        self._keeps: dict[str, bool | None] = {}

    def keeps_on_cpu(self, location: str) -> bool | None:
        """True if restoring a CPU storage saved at `location` returns it unchanged, False if
        it moves it, None if only calling map_location can tell."""
        keeps = self._keeps.get(location, _UNKNOWN)
        if keeps is _UNKNOWN:
            if self.map_location is not None and not isinstance(
                self.map_location, (dict, str, bytes, torch.device)
            ):
                keeps = None
            else:
                keeps = _restore_target(self.map_location, location) == "cpu"
            self._keeps[location] = keeps
        return keeps  # type: ignore[no-any-return]

    def staged_target(self, location: str) -> _staging.DeviceTarget | None:
        """Where a storage saved at `location` streams to, when map_location sends it to a
        staged device (a CUDA device given as str, torch.device or dict value; callables keep
        torch's path, as only calling them tells where a storage goes); else None. Saved
        locations that go to the same device share one target, and so one staging ring."""
        staged = self._targets.get(location, _UNKNOWN)
        if staged is _UNKNOWN:
            try:
                target = _restore_target(self.map_location, location)
                if target is None:
                    staged = None
                elif target in self._devices:
                    staged = self._devices[target]
                else:
                    staged = self._devices[target] = _staging.staging_target(target)
            except Exception as e:
                blamed = self.location_error(e, location)
                if blamed is None:
                    raise
                raise blamed from e
            self._targets[location] = staged
        return staged  # type: ignore[no-any-return]

    def close(self) -> None:
        """Releases the staging rings of the device targets (their pinned memory)."""
        for target in self._devices.values():
            if target is not None:
                target.close()

    def restore(self, storage: Any, location: str) -> Any:
        """torch's restore_location(storage, location), its failures classified."""
        try:
            return self._restore(storage, location)
        except Exception as e:
            blamed = self.location_error(e, location)
            if blamed is None:
                raise
            raise blamed from e

    def location_error(self, e: Exception, location: str) -> CheckpointError | None:
        """The CheckpointError to raise when placing a storage saved at `location` failed
        with `e`, or None to let `e` out as it is. torch's own restore failing (a location
        naming no device) becomes a CheckpointError (a RuntimeError, as torch's) carrying
        torch's message; a map_location callable's exceptions (user code), the machine's
        failures and torch refusing a valid file for this host (a storage saved on a device it
        lacks, such as CUDA) go out as they are, as torch.load raises them."""
        if (
            _is_user_code(self.map_location)
            or is_environment_error(e)
            or is_torch_refusal(e)
            or isinstance(e, CheckpointError)
        ):
            return None
        return CheckpointError(
            f"{self.name}: a storage saved at {location!r:.40} cannot be restored: "
            f"{type(e).__name__}: {e}"
        )
