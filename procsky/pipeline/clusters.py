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

``lifetime: auto`` adds ``--lifetime <walltime - margin> --lifetime-stagger <stagger>``
to ``worker_extra_args`` so that workers hand their data over and leave before the batch
system kills the job (the dask-jobqueue recipe); with ``adapt`` new jobs replace them.
Strings have ``$VARS`` and ``~`` expanded when the cluster is opened.

Profiles are looked up, in order, in ``$PROCSKY_CLUSTERS`` (colon-separated directories),
``~/.config/procsky/clusters``, the ``clusters/`` folder of a source checkout, and the
copies packaged in ``procsky/pipeline/clusters``. A path to a YAML file works too.

Idea of packaged defaults plus site profiles selected by name from dask-jobqueue's
``config.py``/``jobqueue.yaml``.
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any

import yaml

from procsky.errors import ProcskyKeyError, ProcskyValueError

__all__ = ["open_cluster", "find_profile", "load_profile", "profile_dirs", "connect"]

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

#: Thread limits for numerical libraries: dask supplies the parallelism.
THREAD_LIMITS = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "NUMBA_NUM_THREADS": "1",
}


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
        raise ProcskyValueError(
            f"cluster profile {str(path)!r}: cluster: {kind!r} is not one of {sorted(_KINDS)}."
        )
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
    m = _DURATION.match(s)
    if not m:
        raise ProcskyValueError(f"cannot read duration {text!r}; use HH:MM:SS, '90m', '2h' or seconds.")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


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
    for key in ("lifetime", "lifetime_margin", "lifetime_stagger"):
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
        options["job_script_prologue"] = prologue
        local_dir = options.get("local_directory")
        if local_dir and "$" in str(local_dir):  # unset variable: fall back to /tmp
            options["local_directory"] = "/tmp"
    return kind, options, scaling


def open_cluster(profile: str | os.PathLike | dict = "local", **overrides):
    """Start a dask cluster from a profile.

    Parameters
    ----------
    profile : str, path or dict
        ``"local"`` (default), ``"slurm"``, ``"pbs"``, ``"htcondor"``, ``"lsf"``, a user
        profile name or a YAML path.
    **overrides
        Keyword arguments of the cluster class (``n_workers=2``, ``memory="8GiB"``,
        ``queue="debug"`` ...) and ``jobs=N`` / ``adapt={...}`` / ``lifetime=...``.

    Returns
    -------
    distributed.deploy.Cluster
        ``LocalCluster`` or a dask-jobqueue cluster, already scaled as the profile says;
        connect with ``distributed.Client(cluster)``; close it when done.

    Examples
    --------
    >>> cluster = open_cluster("local", n_workers=2)           # doctest: +SKIP
    >>> client = distributed.Client(cluster)                   # doctest: +SKIP
    """
    import importlib

    kind, options, scaling = cluster_kwargs(profile, **overrides)
    module_name, class_name = _KINDS[kind]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ProcskyKeyError(
            f"cluster profile kind {kind!r} needs {module_name}; install it with "
            "`pip install procsky[hpc]` (dask-jobqueue)."
        ) from exc
    if kind == "local":
        env = options.pop("env", None) or THREAD_LIMITS
        for var, val in env.items():  # inherited by worker processes
            os.environ.setdefault(var, str(val))
    cluster = getattr(module, class_name)(**options)
    if "adapt" in scaling:
        cluster.adapt(**scaling["adapt"])
    elif "jobs" in scaling and kind != "local":
        cluster.scale(jobs=int(scaling["jobs"]))
    elif "workers" in scaling:
        cluster.scale(int(scaling["workers"]))
    return cluster


def connect(scheduler: str | None = None, cluster: str | None = None, **overrides):
    """A ``(client, cluster)`` pair from a scheduler address/file or a cluster profile.

    Parameters
    ----------
    scheduler : str, optional
        ``tcp://host:port`` or a scheduler JSON file (``dask scheduler --scheduler-file``).
    cluster : str, optional
        Profile name (used when ``scheduler`` is not given; default ``"local"``).

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
                from procsky.errors import ProcskyFileError

                raise ProcskyFileError(
                    f"--scheduler {scheduler!r} is neither an address (tcp://host:port) nor an "
                    "existing scheduler file (dask scheduler --scheduler-file FILE)."
                )
        return Client(scheduler, timeout="30s"), None
    c = open_cluster(cluster or "local", **overrides)
    try:
        return Client(c), c
    except Exception:
        c.close()
        raise
