"""procsky.sim: a GalSim survey simulator for the simcam instrument.

``simulate(recipe, out, seed=..., mode="calibrated"|"raw")`` draws a dithered multi-band
survey (stars, galaxies, variables, transients, optional NFW shear; per-visit spatially
varying PSFs; sky, noise, cosmic rays, defects, saturation with bleed trails, satellite
trails; TAN-SIP distortion) and writes images, calibration frames, truth tables and a
reference catalogue. Recipes: ``tiny``, ``small``, ``medium`` (``recipe_names()``) or a YAML
path; see ``datasets/README.md`` for the keys and the output layout.
"""

try:  # GalSim comes with the `sim` extra; fail here, with the remedy, rather than in a worker
    import galsim  # noqa: F401
except ImportError as exc:
    raise ModuleNotFoundError(
        f"procsky.sim draws its images with GalSim, which is not installed ({exc}); "
        "install the `sim` extra: pip install 'procsky[sim]'",
        name="galsim",
    ) from exc

from procsky.sim.recipe import Recipe, load_recipe, recipe_names, recipe_path
from procsky.sim.survey import SimulationResult, simulate
from procsky.sim.truth import SimTruth

__all__ = ["simulate", "SimulationResult", "SimTruth", "Recipe", "load_recipe", "recipe_names", "recipe_path"]
