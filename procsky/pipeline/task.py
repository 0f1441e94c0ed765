"""Temporary re-export of :mod:`procsky.tasks.base`, where the task interface now lives.

Tasks sit below the pipeline: import ``Task``, ``Input``, ``Output``, ``TaskConfig`` and
``register_task`` from ``procsky.tasks.base``. This module goes once every import is rewritten.
"""

from procsky.tasks.base import (  # noqa: F401
    ENTRY_POINT_GROUP,
    DatasetKey,
    Input,
    Output,
    QuantumSpec,
    Task,
    TaskConfig,
    __all__,
    build_config,
    complete_data_id,
    data_id_key,
    default_quanta,
    get_task_class,
    override_config,
    register_task,
    registered_tasks,
)
