"""Mask bit numbers used by the kernels.

These mirror the LSST bit order fixed in DESIGN.md section 3 (BAD=0, SAT=1, INTRP=2, CR=3,
EDGE=4, DETECTED=5, DETECTED_NEGATIVE=6, SUSPECT=7, NO_DATA=8). The kernels may not import
``procsky.masks`` (kernels depend on nothing else in procsky), so the numbers are repeated
here; ``tests/test_kernels_*`` checks they agree with ``procsky.masks`` when it exists.
"""

from __future__ import annotations

BAD = 0
SAT = 1
INTRP = 2
CR = 3
EDGE = 4
DETECTED = 5
DETECTED_NEGATIVE = 6
SUSPECT = 7
NO_DATA = 8


def bit(n: int) -> int:
    """Return the integer value of mask bit number ``n`` (``1 << n``)."""
    return 1 << n


#: Pixels never used for statistics (background, PSF fits): BAD | SAT | NO_DATA | CR | EDGE.
BAD_PIXEL_BITS = bit(BAD) | bit(SAT) | bit(NO_DATA) | bit(CR) | bit(EDGE)
