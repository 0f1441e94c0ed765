"""procsky.sim: a GalSim survey simulator for the simcam instrument.

``simulate(recipe, out, seed=..., mode="calibrated"|"raw")`` draws a dithered multi-band
survey (stars, galaxies, variables, transients, optional NFW shear; per-visit spatially
varying PSFs; sky, noise, cosmic rays, defects, saturation with bleed trails, satellite
trails; TAN-SIP distortion) and writes images, calibration frames, truth tables and a
reference catalogue. Recipes: ``tiny``, ``small``, ``medium`` (``recipe_names()``) or a YAML
path; see ``datasets/README.md`` for the keys and the output layout.
"""

from procsky.sim.recipe import Recipe, load_recipe, recipe_names, recipe_path
from procsky.sim.survey import SimulationResult, simulate
from procsky.sim.truth import SimTruth

__all__ = ["simulate", "SimulationResult", "SimTruth", "Recipe", "load_recipe", "recipe_names", "recipe_path"]
