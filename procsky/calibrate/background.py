"""Background step: the sky, estimated twice (the second time with the first detections left out)."""

from __future__ import annotations

import numpy as np

from procsky import masks as _masks
from procsky.calibrate.config import BackgroundConfig
from procsky.calibrate.state import CalibrateState
from procsky.kernels.background import estimate_background

__all__ = ["refine_background", "subtract_background"]

# bits of the default plane layout that keep a pixel out of the second background estimate
_SECOND_PASS_BAD = int(_masks.bits("BAD", "SAT", "NO_DATA", "CR", "EDGE", "DETECTED"))


def subtract_background(state: CalibrateState, config: BackgroundConfig) -> None:
    """First pass (128-px mesh, clipped mode, bicubic spline): fills ``background_first`` and ``sub``.
    The RMS is not interpolated to every pixel (``Background.rms_at`` gives it where needed)."""
    bkg = estimate_background(
        state.image, state.mask, box_size=config.box_size, filter_size=config.filter_size, rms_plane=False
    )
    state.background_first = bkg
    state.background = bkg
    state.sub = state.image - bkg.background


def refine_background(state: CalibrateState, config: BackgroundConfig, detected: np.ndarray) -> None:
    """Second pass with the ``detected`` pixels (and CR pixels) left out: ``background`` and ``sub``
    replaced; repaired cosmic-ray pixels keep their values, moved from the first-pass background to
    this one; unusable input pixels stay 0. ``background_first`` is released (None)."""
    bit = state.bit
    # the DETECTED pixels are left out through ``ignore``: the pixels a copy of the mask with the
    # DETECTED bit set would leave out, without that whole-frame uint32 copy
    bkg = estimate_background(
        state.image,
        state.mask,
        ignore=detected if bit["DETECTED"] & _SECOND_PASS_BAD else None,
        box_size=config.box_size,
        filter_size=config.filter_size,
        bad_bits=_SECOND_PASS_BAD,
        rms_plane=False,
    )
    sub = state.image - bkg.background
    cr = state.cosmic_rays
    if state.n_cr and cr is not None:
        # the repaired values, moved to this background (float32 arithmetic, as over the frame);
        # ``state.sub`` is still the image L.A.Cosmic repaired
        first = state.background_first
        assert first is not None
        ys, xs = np.nonzero((state.mask & np.uint32(bit["CR"])) != 0)
        sub[ys, xs] = state.sub[ys, xs] + first.background[ys, xs] - bkg.background[ys, xs]
    sub[state.bad_input] = 0.0
    state.background = bkg
    state.background_first = None
    state.sub = sub
