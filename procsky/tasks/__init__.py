"""Pipeline tasks: the task interface (:mod:`procsky.tasks.base`) and one module per stage.

Each stage module (isr, calibrate, warp, coadd, diffim, dia, photometry) defines thin tasks
on top of the stage's public functions; tasks do no I/O. They are declared as entry points
(group ``procsky.tasks`` in ``pyproject.toml``) and imported only when a pipeline names
them, so importing this package loads no stage.
"""
