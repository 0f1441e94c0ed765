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
    """First pass (128-px mesh, clipped mode, bicubic spline): fills ``background_first`` and ``sub``."""
    bkg = estimate_background(state.image, state.mask, box_size=config.box_size, filter_size=config.filter_size)
    state.background_first = bkg
    state.background = bkg
    state.sub = state.image - bkg.background


def refine_background(state: CalibrateState, config: BackgroundConfig, detected: np.ndarray) -> None:
    """Second pass with the ``detected`` pixels (and CR pixels) left out: ``background`` and ``sub``
    replaced; repaired cosmic-ray pixels keep their values, moved from the first-pass background to
    this one; unusable input pixels stay 0."""
    bit = state.bit
    mask_det = state.mask | np.where(detected, np.uint32(bit["DETECTED"]), np.uint32(0))
    bkg = estimate_background(
        state.image, mask_det, box_size=config.box_size, filter_size=config.filter_size, bad_bits=_SECOND_PASS_BAD
    )
    sub = state.image - bkg.background
    cr = state.cosmic_rays
    if state.n_cr and cr is not None:
        crm = (state.mask & np.uint32(bit["CR"])) != 0
        sub = np.where(crm, cr.image + state.background_first.background - bkg.background, sub)
    sub = sub.astype(np.float32, copy=False)
    sub[state.bad_input] = 0.0
    state.background = bkg
    state.sub = sub
