"""Pipeline tasks: one module per stage (isr, calibrate, warp, coadd, diffim ...).

Each module registers its tasks with ``procsky.pipeline.register_task``; tasks do no I/O.
"""
