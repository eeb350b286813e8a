"""The one small alignment: 64 bytes.

torch's CPU allocator aligns every storage to 64 bytes, and torch's zip writer starts every
record on a 64-byte boundary; ckptio uses the same value for its small records (an archive's
metadata records, DCP byte items), the slots of a load's block of small storages, the pieces
of a staging buffer, and each storage's copy in an async save's snapshot. Storage records of
a save use ``Options.data_alignment`` (a page, by default) instead.
"""

from __future__ import annotations

__all__ = ["ALIGNMENT", "align_up"]

ALIGNMENT = 64


def align_up(n: int, alignment: int = ALIGNMENT) -> int:
    """The smallest multiple of `alignment` that is >= n."""
    return -(-n // alignment) * alignment
