"""Cluster profiles: named YAML files that say how to start dask workers.

A profile (``clusters/<name>.yaml``) looks like::

    cluster: slurm              # local | slurm | pbs | htcondor | lsf
    options:                    # keyword arguments of the cluster class
      cores: 8                  # (dask_jobqueue.SLURMCluster here)
      processes: 4
      memory: 32GiB
      walltime: "04:00:00"
      job_script_prologue: ["export OMP_NUM_THREADS=1", ...]
    lifetime: auto              # workers retire before the walltime (see below)
    lifetime_margin: 10m
    lifetime_stagger: 4m
    scale: {jobs: 2}            # or adapt: {minimum_jobs: 0, maximum_jobs: 20}
    worker_timeout: 5m          # give up when no worker has joined by then (default 300 s
                                # for batch profiles, 60 s for local)

``lifetime: auto`` adds ``--lifetime <walltime - margin> --lifetime-stagger <stagger>``
to ``worker_extra_args`` so that workers hand their data over and leave before the batch
system kills the job (the dask-jobqueue recipe); with ``adapt`` new jobs replace them.
Strings have ``$VARS`` and ``~`` expanded when the cluster is opened.

Worker settings procsky applies to every profile: the thread limits of numerical libraries
(:data:`THREAD_LIMITS`; dask supplies the parallelism) and :data:`WORKER_DASK_CONFIG`
(dask's statistical profiler off: it walks every busy thread's Python stack 100 times a
second in the worker's event loop, CPU the quanta would otherwise get). A profile can turn
either back on: ``env:`` (local) or ``job_script_prologue`` (batch) for the first, and
``dask_config: {distributed.worker.profile.enabled: true}`` for the second.

Profiles are looked up, in order, in ``$PROCSKY_CLUSTERS`` (colon-separated directories),
``~/.config/procsky/clusters``, the ``clusters/`` folder of a source checkout, and the
copies packaged in ``procsky/pipeline/clusters``. A path to a YAML file works too.

Before anything starts, :func:`check_profile` reads the profile, imports the cluster
class and, for batch systems, checks that the submit and cancel commands are on ``PATH``
(without them dask-jobqueue logs a traceback per submission attempt and waits forever).
After the cluster starts, :func:`wait_for_workers` bounds the wait for the first worker.

Idea of packaged defaults plus site profiles selected by name from dask-jobqueue's
``config.py``/``jobqueue.yaml``.
"""

from __future__ import annotations

import copy
import logging
import os
import re
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from procsky.errors import ProcskyError, ProcskyFileError, ProcskyKeyError, ProcskyValueError

__all__ = [
    "open_cluster",
    "find_profile",
    "load_profile",
    "profile_dirs",
    "connect",
    "check_profile",
    "ClusterSpec",
    "WorkerTimeoutError",
    "wait_for_workers",
    "dashboard_status",
    "quiet_shutdown",
    "mute_cluster",
    "unmute",
]

_PACKAGED = Path(__file__).resolve().parent / "clusters"
_CHECKOUT = Path(__file__).resolve().parents[2] / "clusters"

_KINDS = {
    "local": ("distributed", "LocalCluster"),
    "slurm": ("dask_jobqueue", "SLURMCluster"),
    "pbs": ("dask_jobqueue", "PBSCluster"),
    "htcondor": ("dask_jobqueue", "HTCondorCluster"),
    "lsf": ("dask_jobqueue", "LSFCluster"),
    "sge": ("dask_jobqueue", "SGECluster"),
}

#: Commands each batch system needs (submit first, cancel last; the middle one queries), and
#: where to get them. Checked with :func:`shutil.which` before a cluster is created.
#: Debian 12 has slurm-client/slurm-wlm and gridengine-client; it carries no PBS, HTCondor
#: or LSF client (``slurm-wlm-torque`` only wraps ``qsub`` around SLURM).
BATCH_TOOLS: dict[str, tuple[tuple[str, ...], str]] = {
    "slurm": (
        ("sbatch", "squeue", "scancel"),
        "install the SLURM client commands (Debian/Ubuntu: `apt-get install slurm-client`, "
        "or `apt-get install slurm-wlm` for a whole one-node SLURM), or load your site's "
        "slurm module",
    ),
    "pbs": (
        ("qsub", "qstat", "qdel"),
        "install your site's PBS client (OpenPBS/PBS Pro or Torque; Debian packages neither "
        "OpenPBS nor Torque, see openpbs.org), or load your site's pbs module",
    ),
    "htcondor": (
        ("condor_submit", "condor_q", "condor_rm"),
        "install the HTCondor client (`apt-get install htcondor` after adding the "
        "HTCondor apt repository from htcondor.org; Debian itself does not carry it)",
    ),
    "lsf": (
        ("bsub", "bjobs", "bkill"),
        "LSF is proprietary and has no Debian package: source your site's LSF environment "
        "(`. $LSF_ENVDIR/profile.lsf`) or ask your administrators",
    ),
    "sge": (
        ("qsub", "qstat", "qdel"),
        "install the Grid Engine client (Debian/Ubuntu: `apt-get install gridengine-client`)",
    ),
}

#: Default bound on the wait for the first worker, s.
DEFAULT_WORKER_TIMEOUT = {"local": 60.0, "batch": 300.0}


class WorkerTimeoutError(ProcskyError, TimeoutError):
    """No dask worker joined the cluster within the allowed time."""


#: Thread limits for numerical libraries: dask supplies the parallelism.
THREAD_LIMITS = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "NUMBA_NUM_THREADS": "1",
}


#: dask settings of the workers and of the nannies watching them (dotted keys); measured
#: on the demo's calibrate and warp stages (``/proc`` thread clocks):
#:
#: * dask's profiler walks each busy thread's Python stack every 10 ms in the worker's
#:   event loop: ~0.02 CPU-s per second per worker, ~7 % beside a quantum's own CPU on an
#:   idle core, which a second worker on the same cores pays for. procsky records each
#:   quantum's CPU itself; the dashboard's "Profile" page stays empty unless a profile sets
#:   ``dask_config: {distributed.worker.profile.enabled: true}``.
#: * the nanny's memory watch (kill a worker past 95 % of its limit) and the worker's own
#:   (spill, pause) build a psutil process object every 100 ms; every 500 ms still stops a
#:   runaway worker well before the operating system would.
WORKER_DASK_CONFIG = {
    "distributed.worker.profile.enabled": False,
    "distributed.worker.memory.monitor-interval": "500ms",
}


def _dask_env_name(key: str) -> str:
    """The environment variable dask reads for dotted config ``key``."""
    return "DASK_" + "__".join(part.upper().replace("-", "_") for part in key.split("."))


def _worker_dask_config(doc: dict) -> dict:
    """:data:`WORKER_DASK_CONFIG` updated with the profile's ``dask_config`` (dotted keys)."""
    extra = doc.get("dask_config") or {}
    if not isinstance(extra, dict):
        raise ProcskyValueError(f"cluster profile: dask_config must be a mapping of dotted keys, not {extra!r}.")
    return {**WORKER_DASK_CONFIG, **{str(k): v for k, v in extra.items()}}


def profile_dirs() -> list[Path]:
    """Directories searched for profiles, in order."""
    dirs = []
    env = os.environ.get("PROCSKY_CLUSTERS")
    if env:
        dirs += [Path(p).expanduser() for p in env.split(os.pathsep) if p]
    dirs.append(Path("~/.config/procsky/clusters").expanduser())
    dirs += [_CHECKOUT, _PACKAGED]
    return dirs


def find_profile(name: str | os.PathLike) -> Path:
    """Path of profile ``name`` (a name such as ``"slurm"`` or a YAML path)."""
    p = Path(name)
    if p.suffix in (".yaml", ".yml"):
        if p.exists():
            return p
        raise ProcskyKeyError(f"cluster profile file {str(p)!r} does not exist.")
    for d in profile_dirs():
        for ext in (".yaml", ".yml"):
            cand = d / f"{name}{ext}"
            if cand.exists():
                return cand
    known = sorted({f.stem for d in profile_dirs() if d.is_dir() for f in d.glob("*.y*ml")})
    raise ProcskyKeyError(
        f"no cluster profile {str(name)!r} (known: {', '.join(known) or 'none'}); put "
        f"{name}.yaml in ~/.config/procsky/clusters or a directory listed in $PROCSKY_CLUSTERS."
    )


def load_profile(name: str | os.PathLike) -> dict:
    """Read a profile into a dict with keys ``cluster``, ``options`` and the scaling keys."""
    path = find_profile(name)
    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ProcskyValueError(f"cluster profile {str(path)!r} is not valid YAML: {exc}") from exc
    kind = doc.get("cluster", "local")
    if kind not in _KINDS:
        raise ProcskyValueError(f"cluster profile {str(path)!r}: cluster: {kind!r} is not one of {sorted(_KINDS)}.")
    doc["cluster"] = kind
    doc.setdefault("options", {})
    doc["path"] = str(path)
    return doc


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")


def parse_duration(text: str | int | float) -> float:
    """Seconds from ``"HH:MM:SS"``, ``"D-HH:MM:SS"``, ``"MM:SS"``, ``"90m"``, ``"2h"`` or a number."""
    if isinstance(text, (int, float)):
        return float(text)
    s = str(text).strip()
    days = 0
    if "-" in s and ":" in s:
        d, s = s.split("-", 1)
        days = int(d)
    if ":" in s:
        parts = [float(p) for p in s.split(":")]
        while len(parts) < 3:
            parts.insert(0, 0.0)
        h, m, sec = parts
        return days * 86400 + h * 3600 + m * 60 + sec
    match = _DURATION.match(s)
    if not match:
        raise ProcskyValueError(f"cannot read duration {text!r}; use HH:MM:SS, '90m', '2h' or seconds.")
    return float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]


def _expand(value):
    if isinstance(value, str):
        return os.path.expanduser(os.path.expandvars(value))
    if isinstance(value, list):
        return [_expand(v) for v in value]
    if isinstance(value, dict):
        return {k: _expand(v) for k, v in value.items()}
    return value


def _lifetime_args(doc: dict, options: dict, kind: str = "") -> list[str]:
    """``--lifetime``/``--lifetime-stagger`` worker arguments derived from the walltime."""
    lifetime = doc.get("lifetime")
    if not lifetime:
        return []
    stagger = parse_duration(doc.get("lifetime_stagger", "4m"))
    if lifetime == "auto":
        walltime = options.get("walltime")
        if not walltime:
            return []
        margin = parse_duration(doc.get("lifetime_margin", "10m"))
        if kind == "lsf" and str(walltime).count(":") == 1:  # LSF walltime is HH:MM
            walltime = f"{walltime}:00"
        seconds = parse_duration(walltime) - margin - stagger
        if seconds <= 60:
            raise ProcskyValueError(
                f"walltime {walltime!r} is too short for lifetime_margin {doc.get('lifetime_margin')!r} "
                f"plus lifetime_stagger; lengthen the walltime or shorten the margin."
            )
    else:
        seconds = parse_duration(lifetime)
    return ["--lifetime", f"{int(seconds)}s", "--lifetime-stagger", f"{int(stagger)}s"]


def cluster_kwargs(profile: str | os.PathLike | dict = "local", **overrides) -> tuple[str, dict, dict]:
    """Resolve a profile and overrides into ``(kind, class kwargs, scaling)``.

    Parameters
    ----------
    profile : str, path or dict
        Profile name/path, or an already loaded profile dict.
    **overrides
        Class keyword arguments replacing the profile's; ``jobs=N``/``n_workers=N`` scale,
        ``adapt={...}`` adapts, ``lifetime=...`` overrides the lifetime rule.

    Returns
    -------
    kind : str
    kwargs : dict
    scaling : dict
        ``{"jobs": N}`` or ``{"adapt": {...}}`` or ``{}``.
    """
    doc = copy.deepcopy(profile) if isinstance(profile, dict) else load_profile(profile)
    for key in ("lifetime", "lifetime_margin", "lifetime_stagger", "worker_timeout"):
        if key in overrides:
            doc[key] = overrides.pop(key)
    scaling: dict[str, Any] = {}
    if "adapt" in doc:
        scaling = {"adapt": doc["adapt"]}
    elif "scale" in doc:
        scaling = dict(doc["scale"])
    if "adapt" in overrides:
        adapt = overrides.pop("adapt")
        scaling = {"adapt": adapt} if adapt else {}
    if "jobs" in overrides:
        scaling = {"jobs": overrides.pop("jobs")}
    options = dict(doc.get("options") or {})
    options.update(overrides)
    options = _expand(options)
    kind = doc["cluster"]
    if kind == "local" and doc.get("env") and "env" not in options:
        options["env"] = dict(doc["env"])
    if kind == "local" and options.get("processes", True) and "config" not in options:
        # The nanny hands its own dask config to the worker process it starts (overriding
        # the worker's environment), so local workers get theirs through ``config``.
        options["worker_dask_config"] = _worker_dask_config(doc)
    if kind != "local":
        extra = list(options.get("worker_extra_args") or [])
        if "--lifetime" not in extra:
            extra += _lifetime_args(doc, options, kind)
        options["worker_extra_args"] = extra
        prologue = list(options.get("job_script_prologue") or [])
        have = " ".join(prologue)
        for var, val in THREAD_LIMITS.items():
            if var not in have:
                prologue.append(f"export {var}={val}")
        for key, val in _worker_dask_config(doc).items():
            var = _dask_env_name(key)
            if var not in have:
                prologue.append(f"export {var}={val!r}")
        options["job_script_prologue"] = prologue
        local_dir = options.get("local_directory")
        if local_dir and "$" in str(local_dir):  # unset variable: fall back to /tmp
            options["local_directory"] = "/tmp"
    return kind, options, scaling


@dataclass
class ClusterSpec:
    """A checked cluster profile: what :func:`open_cluster` will start.

    Attributes
    ----------
    name : str
        Profile name or path as given.
    path : str
        The YAML file read.
    kind : str
        ``local``, ``slurm``, ``pbs``, ``htcondor``, ``lsf`` or ``sge``.
    options : dict
        Keyword arguments of the cluster class.
    scaling : dict
        ``{"jobs": N}``, ``{"workers": N}``, ``{"adapt": {...}}`` or ``{}``.
    worker_timeout : float, s
        How long to wait for the first worker.
    """

    name: str
    path: str
    kind: str
    options: dict
    scaling: dict
    worker_timeout: float

    @property
    def batch(self) -> bool:
        return self.kind != "local"

    @property
    def min_workers(self) -> int:
        """Workers the cluster starts on its own (0: adaptive with a minimum of 0)."""
        adapt = self.scaling.get("adapt")
        if adapt is not None:
            return int(adapt.get("minimum_jobs", adapt.get("minimum", 0)) or 0)
        return 1


def _cluster_class(kind: str):
    import importlib

    module_name, class_name = _KINDS[kind]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        hint = "pip install 'procsky[hpc]'" if module_name == "dask_jobqueue" else f"pip install {module_name}"
        raise ProcskyKeyError(
            f"cluster profile kind {kind!r} needs the {module_name} package, which is not "
            f"installed; install it with `{hint}`."
        ) from exc
    return getattr(module, class_name)


def require_batch_tools(kind: str, profile: str = "") -> None:
    """Raise :class:`ProcskyFileError` when a batch system's commands are not on ``PATH``."""
    if kind not in BATCH_TOOLS:
        return
    commands, remedy = BATCH_TOOLS[kind]
    missing = [c for c in commands if shutil.which(c) is None]
    if not missing:
        return
    label = f"cluster profile {profile!r} ({kind})" if profile and profile != kind else f"cluster profile {kind!r}"
    raise ProcskyFileError(
        f"{label} needs the batch commands {', '.join(commands)}, but {', '.join(missing)} "
        f"{'is' if len(missing) == 1 else 'are'} not on PATH; {remedy}. "
        "To run on this machine instead, use --cluster local."
    )


def check_profile(
    profile: str | os.PathLike | dict = "local", *, require_tools: bool = True, **overrides
) -> ClusterSpec:
    """Read and check a cluster profile without starting anything.

    Parameters
    ----------
    profile : str, path or dict
        As in :func:`open_cluster`.
    require_tools : bool
        Check that the batch system's commands are on ``PATH`` (batch kinds only).
    **overrides
        As in :func:`open_cluster`; ``worker_timeout=`` (s or a duration) too.

    Returns
    -------
    ClusterSpec

    Raises
    ------
    ProcskyKeyError
        Unknown profile, or the cluster class's package is missing (dask-jobqueue).
    ProcskyValueError
        The profile is not valid YAML, names an unknown kind, or has bad durations.
    ProcskyFileError
        A batch command is missing.
    """
    doc = copy.deepcopy(profile) if isinstance(profile, dict) else load_profile(profile)
    name = str(profile if not isinstance(profile, dict) else doc.get("path", doc["cluster"]))
    if "worker_timeout" in overrides:
        doc["worker_timeout"] = overrides.pop("worker_timeout")
    kind, options, scaling = cluster_kwargs(doc, **overrides)
    timeout = doc.get("worker_timeout")
    if timeout is None:
        timeout = DEFAULT_WORKER_TIMEOUT["local" if kind == "local" else "batch"]
    timeout = parse_duration(timeout)
    if timeout <= 0:
        raise ProcskyValueError(f"worker_timeout must be positive, got {doc.get('worker_timeout')!r}.")
    if require_tools and kind != "local":
        require_batch_tools(kind, name)  # first: cheap, while importing dask-jobqueue is not
    _cluster_class(kind)
    return ClusterSpec(name, str(doc.get("path", "")), kind, options, scaling, timeout)


def open_cluster(profile: str | os.PathLike | dict | ClusterSpec = "local", **overrides):
    """Start a dask cluster from a profile.

    Parameters
    ----------
    profile : str, path, dict or ClusterSpec
        ``"local"`` (default), ``"slurm"``, ``"pbs"``, ``"htcondor"``, ``"lsf"``, a user
        profile name, a YAML path, or the result of :func:`check_profile`.
    **overrides
        Keyword arguments of the cluster class (``n_workers=2``, ``memory="8GiB"``,
        ``queue="debug"`` ...) and ``jobs=N`` / ``adapt={...}`` / ``lifetime=...``.

    Returns
    -------
    distributed.deploy.Cluster
        ``LocalCluster`` or a dask-jobqueue cluster, already scaled as the profile says;
        connect with ``distributed.Client(cluster)``; close it when done. Local worker
        processes ignore SIGINT: Ctrl-C reaches the driver, which shuts them down.

    Raises
    ------
    ProcskyFileError
        The profile submits jobs but the batch system's commands are not on ``PATH``.

    Examples
    --------
    >>> cluster = open_cluster("local", n_workers=2)           # doctest: +SKIP
    >>> client = distributed.Client(cluster)                   # doctest: +SKIP
    """
    if isinstance(profile, ClusterSpec):
        if overrides:
            raise ProcskyValueError("open_cluster: pass overrides to check_profile, not with a ClusterSpec.")
        spec = profile
    else:
        # Batch commands are needed only if jobs are submitted (job_script() needs none).
        spec = check_profile(profile, require_tools=False, **overrides)
    kind, scaling = spec.kind, spec.scaling
    options = copy.deepcopy(spec.options)
    if kind != "local" and scaling:
        require_batch_tools(kind, spec.name)
    klass = _cluster_class(kind)
    import dask.config

    worker_config = None
    if kind == "local":
        env = options.pop("env", None) or THREAD_LIMITS
        for var, val in env.items():  # inherited by worker processes
            os.environ.setdefault(var, str(val))
        worker_config = options.pop("worker_dask_config", None)
        if worker_config:
            # A full copy of this process's config with the workers' settings over it: the
            # nanny merges ``config`` over its own shallowly (top-level keys replaced).
            worker_dask = copy.deepcopy(dask.config.config)
            dask.config.set(worker_config, config=worker_dask)  # into the copy only
            options["config"] = worker_dask
        if options.get("processes", True):
            preload = options.get("preload") or []
            preload = [preload] if isinstance(preload, str) else list(preload)
            options["preload"] = preload + [__name__]  # runs dask_setup() in each worker
    if worker_config:
        with dask.config.set(worker_config):  # the local nannies live in this process
            cluster = klass(**options)
    else:
        cluster = klass(**options)
    try:
        if "adapt" in scaling:
            cluster.adapt(**scaling["adapt"])
        elif "jobs" in scaling and kind != "local":
            cluster.scale(jobs=int(scaling["jobs"]))
        elif "workers" in scaling:
            cluster.scale(int(scaling["workers"]))
    except BaseException:
        cluster.close()
        raise
    return cluster


def dask_setup(worker=None) -> None:  # pragma: no cover - runs in local worker processes
    """Worker preload of local clusters (see :func:`open_cluster`).

    Ctrl-C in a terminal signals the whole process group, local workers included; each
    would print a KeyboardInterrupt traceback. The driver handles the interrupt and closes
    the cluster, so workers ignore SIGINT. ``dask.array`` is imported here, in one thread:
    imported for the first time while a task thread also imports it, its submodules can see
    a half-initialised ``dask`` package (``cannot import name 'array' from 'dask'``).
    """
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread of the worker process
        pass
    import dask.array  # noqa: F401


def connect(scheduler: str | None = None, cluster: str | os.PathLike | ClusterSpec | None = None, **overrides):
    """A ``(client, cluster)`` pair from a scheduler address/file or a cluster profile.

    Parameters
    ----------
    scheduler : str, optional
        ``tcp://host:port`` or a scheduler JSON file (``dask scheduler --scheduler-file``).
    cluster : str or ClusterSpec, optional
        Profile name or checked profile (used when ``scheduler`` is not given; default
        ``"local"``).

    Returns
    -------
    client : distributed.Client
    cluster : Cluster or None
        The cluster opened here (close it after the client), ``None`` for ``scheduler``.
    """
    from distributed import Client

    if scheduler:
        if "://" not in scheduler:
            if os.path.isfile(scheduler):
                return Client(scheduler_file=scheduler), None
            if ":" not in scheduler:
                raise ProcskyFileError(
                    f"--scheduler {scheduler!r} is neither an address (tcp://host:port) nor an "
                    "existing scheduler file (dask scheduler --scheduler-file FILE)."
                )
        return Client(scheduler, timeout="30s"), None
    c = open_cluster(cluster or "local", **overrides)
    try:
        return Client(c), c
    except BaseException:
        c.close()
        raise


def wait_for_workers(client, timeout: float, *, cluster=None, spec: ClusterSpec | None = None, n: int = 1) -> None:
    """Wait until ``n`` workers have joined, at most ``timeout`` seconds.

    Raises
    ------
    WorkerTimeoutError
        With what was asked of the batch system and where to look.
    """
    try:
        client.wait_for_workers(n, timeout=timeout)
        return
    except TimeoutError:
        pass
    if spec is not None and spec.batch:
        jobs = len(getattr(cluster, "workers", {}) or {})
        status = {
            "slurm": "squeue --me",
            "pbs": "qstat -u $USER",
            "htcondor": "condor_q",
            "lsf": "bjobs",
            "sge": "qstat",
        }.get(spec.kind, "the queue")
        logs = spec.options.get("log_directory")
        where = f"; the job logs are in {logs}/" if logs else ""
        if jobs == 0:
            where += "; the profile asks for no jobs: give it `scale: {jobs: N}` or pass --workers N"
        msg = (
            f"no dask worker joined within {timeout:g} s (cluster profile {spec.name!r}, "
            f"{jobs} job(s) submitted); check them with `{status}`{where}. If they are still "
            "queued, wait longer with --worker-timeout SECONDS (or worker_timeout: in the "
            "profile); if they failed, fix the queue/account/memory options of the profile."
        )
    elif spec is not None:
        msg = (
            f"no dask worker started within {timeout:g} s on this machine (cluster profile "
            f"{spec.name!r}); the worker processes may have crashed at start (see the messages "
            "above) or the machine is overloaded; retry with --workers 1 or a longer "
            "--worker-timeout."
        )
    else:
        msg = (
            f"no dask worker is connected to the scheduler {client.scheduler.address} after "
            f"{timeout:g} s; start workers (`dask worker {client.scheduler.address}`) or "
            "wait longer with --worker-timeout."
        )
    raise WorkerTimeoutError(msg)


def _scheduler_dashboard(dask_scheduler=None):
    import sys

    return "dashboard" in getattr(dask_scheduler, "services", {}) and "distributed.dashboard.scheduler" in sys.modules


def dashboard_status(client) -> tuple[str | None, str | None]:
    """``(link, None)`` when the scheduler serves the bokeh dashboard, else ``(None, hint)``.

    Without bokeh the scheduler still answers on the dashboard port, with a page saying
    bokeh is missing; so the link is shown only when the scheduler loaded its dashboard.
    """
    try:
        from distributed.versions import BOKEH_REQUIREMENT

        need = str(BOKEH_REQUIREMENT)
    except ImportError:  # pragma: no cover - older distributed
        need = "bokeh>=3.1"
    hint = f"dask dashboard off: install {need} (pip install '{need}') for the dask dashboard"
    try:
        serves = bool(client.run_on_scheduler(_scheduler_dashboard))
    except Exception:  # scheduler refuses pickled functions, or lost: do not promise a link
        serves = False
    if not serves:
        return None, hint
    return client.dashboard_link, None


#: Loggers that narrate a cluster's shutdown (cancelled tasks, closed comms, lost workers).
_NOISY_LOGGERS = ("distributed", "tornado", "asyncio", "dask_jobqueue")


def _silence_logging() -> dict[str, int]:
    """Mute :data:`_NOISY_LOGGERS`; return their previous levels."""
    levels = {}
    for name in _NOISY_LOGGERS:
        logger = logging.getLogger(name)
        levels[name] = logger.level
        logger.setLevel(logging.CRITICAL + 1)
    return levels


def _mute_worker() -> None:  # pragma: no cover - runs on workers
    """Worker side of :func:`mute_cluster`: no log lines, no "Exception ignored in" lines.

    The latter come from the garbage collection of ``worker_client`` clients whose event
    loop is already closed while the worker shuts down.
    """
    import sys

    _silence_logging()
    sys.unraisablehook = lambda unraisable: None


def mute_cluster(client=None, timeout: float = 3.0) -> dict[str, int]:
    """Silence the shutdown chatter of this process and of ``client``'s workers.

    Returns the previous logger levels of this process (for :func:`unmute`). The workers
    are told within ``timeout`` seconds or not at all (a lost worker must not stall Ctrl-C).
    """
    import threading

    levels = _silence_logging()
    if client is not None:

        def tell():
            try:
                client.run(_mute_worker, on_error="ignore")
            except Exception:
                pass

        t = threading.Thread(target=tell, name="procsky-mute-workers", daemon=True)
        t.start()
        t.join(timeout)
    return levels


def unmute(levels: dict[str, int]) -> None:
    """Restore logger levels returned by :func:`mute_cluster`."""
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


def quiet_shutdown(client=None, cluster=None) -> None:
    """Close ``client`` and ``cluster`` without their shutdown chatter (after Ctrl-C).

    Ignores further SIGINTs meanwhile (a second Ctrl-C would otherwise interrupt the
    closing half-way, leaving batch jobs behind), silences the loggers of this process
    and of the workers, and cancels submitted batch jobs (``cluster.close()``).
    """
    import threading

    in_main = threading.current_thread() is threading.main_thread()
    old = signal.signal(signal.SIGINT, signal.SIG_IGN) if in_main else None
    levels = mute_cluster(client)
    try:
        if client is not None:
            try:
                client.close(timeout=10)
            except Exception:
                pass
        if cluster is not None:
            try:
                cluster.close(timeout=20)
            except Exception:
                pass
    finally:
        unmute(levels)
        if old is not None:
            signal.signal(signal.SIGINT, old)
