"""A throw-away one-node SLURM cluster on loopback, for tests.

:class:`SlurmServer` writes a temporary ``slurm.conf`` (``AuthType=auth/none`` and
``CredType=cred/none`` when the installed SLURM ships those plugins, otherwise MUNGE with
a key generated in the temporary directory and a private ``munged``), starts
``slurmctld`` and ``slurmd`` in the foreground as child processes, waits for the node to
be idle, and stops everything on :meth:`stop`. Commands run by the test (``sbatch`` via
dask-jobqueue, ``squeue``, ``scancel``) find the cluster through ``SLURM_CONF``.

``SlurmServer.unavailable()`` returns a reason string when it cannot work here (binaries
missing, not root), for ``pytest.skip``.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

__all__ = ["SlurmServer"]

_BINARIES = ("slurmctld", "slurmd", "sbatch", "squeue", "scancel", "sinfo")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _plugin_dir() -> str | None:
    for d in sorted(glob.glob("/usr/lib/x86_64-linux-gnu/slurm*")) + sorted(glob.glob("/usr/lib*/slurm*")):
        if os.path.isdir(d) and glob.glob(os.path.join(d, "auth_*.so")):
            return d
    return None


class SlurmServer:
    """One slurmctld + one slurmd on 127.0.0.1 in ``workdir``.

    Parameters
    ----------
    workdir : path
        Empty temporary directory for configuration, state, spool and logs.
    cpus : int
        CPUs the node advertises.
    memory_mb : int
        RealMemory of the node, MB.
    """

    def __init__(self, workdir, *, cpus: int = 2, memory_mb: int = 4000):
        self.workdir = Path(workdir)
        self.cpus = cpus
        self.memory_mb = memory_mb
        self.node = "localhost"
        self.procs: list[subprocess.Popen] = []
        self.conf = self.workdir / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))

    # -- availability -------------------------------------------------------------------
    @staticmethod
    def unavailable() -> str | None:
        missing = [b for b in _BINARIES if shutil.which(b) is None]
        if missing:
            return f"SLURM binaries missing: {', '.join(missing)} (apt install slurm-wlm)"
        if os.geteuid() != 0:
            return "the throw-away SLURM cluster needs root (slurmd runs jobs as their user)"
        pdir = _plugin_dir()
        if pdir is None:
            return "no SLURM plugin directory found"
        if not os.path.exists(os.path.join(pdir, "auth_none.so")) and shutil.which("munged") is None:
            return "neither auth/none nor munged is available"
        return None

    # -- life cycle -----------------------------------------------------------------------
    def start(self, timeout: float = 60.0, attempts: int = 3) -> SlurmServer:
        """Start slurmctld and slurmd and wait for the node to be idle.

        The two ports are picked free but only bound by the daemons later, so another process
        of a busy machine can take one in between ("Address already in use"): then the
        daemons are stopped and started again on new ports, up to ``attempts`` times.
        """
        for attempt in range(attempts):
            try:
                return self._start_once(timeout)
            except RuntimeError as exc:
                if "Address already in use" not in str(exc) or attempt == attempts - 1:
                    raise
                self.stop()
                for f in (self.workdir / "log").glob("*.log"):
                    f.unlink()
        raise AssertionError("unreachable")

    def _start_once(self, timeout: float) -> SlurmServer:
        w = self.workdir
        for sub in ("state", "spool", "log"):
            (w / sub).mkdir(parents=True, exist_ok=True)
        pdir = _plugin_dir()
        auth_none = os.path.exists(os.path.join(pdir, "auth_none.so")) and os.path.exists(
            os.path.join(pdir, "cred_none.so")
        )
        ctld_port, d_port = _free_port(), _free_port()
        lines = [
            "ClusterName=procskytest",
            f"SlurmctldHost={self.node}(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            f"SlurmdPort={d_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            f"PluginDir={pdir}",
            f"StateSaveLocation={w / 'state'}",
            f"SlurmdSpoolDir={w / 'spool'}",
            f"SlurmctldPidFile={w / 'slurmctld.pid'}",
            f"SlurmdPidFile={w / 'slurmd.pid'}",
            f"SlurmctldLogFile={w / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={w / 'log' / 'slurmd.log'}",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "SchedulerType=sched/builtin",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core_Memory",
            "MpiDefault=none",
            "SwitchType=switch/none",
            "ReturnToService=2",
            "SlurmdTimeout=60",
            "InactiveLimit=0",
            "KillWait=5",
            "MinJobAge=5",
            f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={self.memory_mb} State=UNKNOWN",
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
        ]
        if auth_none:
            lines += ["AuthType=auth/none", "CredType=cred/none"]
        else:
            lines += ["AuthType=auth/munge", "CredType=cred/munge", f"AuthInfo=socket={w / 'munge.socket'}"]
            self._start_munge()
        self.conf.write_text("\n".join(lines) + "\n")
        # cgroup.conf is read by slurmd even with the non-cgroup plugins on some versions.
        (w / "cgroup.conf").write_text("CgroupPlugin=autodetect\nIgnoreSystemd=yes\n")
        self._spawn(["slurmctld", "-D", "-i", "-f", str(self.conf)], "slurmctld.out")
        self._spawn(["slurmd", "-D", "-f", str(self.conf), "-N", self.node], "slurmd.out")
        deadline = time.time() + timeout
        state = ""
        while time.time() < deadline:
            for p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"{p.args[0]} exited with {p.returncode}:\n{self.logs()}")
            r = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], env=self.env, capture_output=True, text=True)
            state = r.stdout.strip()
            if r.returncode == 0 and state.startswith("idle"):
                return self
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"SLURM node not idle after {timeout} s (state {state!r}):\n{self.logs()}")

    def _start_munge(self) -> None:
        w = self.workdir
        key = w / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self._spawn(
            [
                "munged",
                "-F",
                "--force",
                f"--key-file={key}",
                f"--socket={w / 'munge.socket'}",
                f"--pid-file={w / 'munged.pid'}",
                f"--log-file={w / 'log' / 'munged.log'}",
                f"--seed-file={w / 'munge.seed'}",
            ],
            "munged.out",
        )
        time.sleep(1.0)

    def _spawn(self, cmd: list[str], out: str) -> None:
        fh = open(self.workdir / "log" / out, "wb")
        self.procs.append(
            subprocess.Popen(cmd, env=self.env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        )
        fh.close()

    def logs(self) -> str:
        text = []
        for f in sorted((self.workdir / "log").glob("*")):
            try:
                text.append(f"--- {f.name}\n" + f.read_text(errors="replace")[-3000:])
            except OSError:
                pass
        return "\n".join(text)

    def squeue(self) -> str:
        return subprocess.run(["squeue", "-h", "-o", "%i %T %j"], env=self.env, capture_output=True, text=True).stdout

    def _our_stepds(self) -> list[int]:
        """slurmstepd processes started by this cluster (their SLURM_CONF is ours)."""
        pids = []
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                if not (d / "cmdline").read_bytes().startswith(b"slurmstepd"):
                    continue
                env = (d / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"SLURM_CONF={self.conf}".encode() in env:
                pids.append(int(d.name))
        return pids

    def stop(self) -> None:
        if self.procs:
            subprocess.run(["scancel", "--full", "-u", "root"], env=self.env, capture_output=True)
            deadline = time.time() + 20  # let slurmd finish the jobs' steps cleanly
            while time.time() < deadline and (self.squeue().strip() or self._our_stepds()):
                time.sleep(0.5)
        for pid in self._our_stepds():  # still there: do not leave them behind
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for p in reversed(self.procs):
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for p in reversed(self.procs):
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        self.procs.clear()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
        return False
