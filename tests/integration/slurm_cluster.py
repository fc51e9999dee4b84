"""A real SLURM cluster on this machine for the integration tests: munged, slurmctld and two slurmd.

The session fixture :func:`slurm_cluster` writes a slurm.conf in a temporary directory with two
emulated nodes, n1 and n2, on this host (``slurmd -N n1`` and ``slurmd -N n2``, one CPU each),
starts the daemons as root and waits until both nodes are idle. Commands reach the cluster through
``SLURM_CONF`` in :attr:`SlurmCluster.env`. Everything is stopped by pid and removed afterwards.

Needs root (munged and slurmd run as root here) and Debian's slurmctld, slurmd, slurm-client and
munge: when they are missing, tools/install_slurm.sh installs them (apt). If SLURM cannot run, the
tests are skipped with the reason, unless ``DIVPREC_REQUIRE_SLURM=1`` turns that into a failure
(for CI, where SLURM is expected to work). ``DIVPREC_KEEP_SLURM=1`` keeps the directory (confs,
daemon logs) for inspection.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
INSTALL_SCRIPT = REPO / "tools" / "install_slurm.sh"
BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "scancel", "sinfo")
NODES = ("n1", "n2")
START_TIMEOUT_S = 30
# Job states after which a job runs no more (scontrol's JobState).
FINISHED_STATES = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
}


@dataclass
class SlurmCluster:
    """A running local cluster: its directory, environment and a few helpers for tests."""

    root: Path
    conf: Path
    env: dict[str, str]
    partition: str = "debug"
    nodes: tuple[str, ...] = NODES
    _daemons: dict[str, int] = field(default_factory=dict)

    def run(
        self, *args: str, check: bool = True, timeout: float = 30
    ) -> subprocess.CompletedProcess:
        """Run a SLURM client command against this cluster."""
        proc = subprocess.run(
            list(args), env=self.env, capture_output=True, text=True, timeout=timeout
        )
        if check and proc.returncode != 0:
            raise RuntimeError(
                f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}\n"
                + self.logs()
            )
        return proc

    def sbatch(
        self,
        script: str | Path,
        *script_args: str,
        options: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
        cwd: str | Path | None = None,
    ) -> int:
        """Submit a batch job (``sbatch --parsable``) and return its id."""
        proc = subprocess.run(
            ["sbatch", "--parsable", *options, str(script), *script_args],
            env={**self.env, **(env or {})},
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=30,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"sbatch failed:\n{proc.stdout}{proc.stderr}\n" + self.logs())
        return int(proc.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, ExitCode, Restarts, NodeList, ...)."""
        out = self.run("scontrol", "show", "job", "-o", str(job_id)).stdout
        info = {}
        for token in out.split():
            key, sep, value = token.partition("=")
            if sep and key not in info:
                info[key] = value
        return info

    def wait_finished(self, job_id: int, timeout: float) -> dict[str, str]:
        """Poll until the job has finished (a state in FINISHED_STATES); fail after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            if info.get("JobState") in FINISHED_STATES:
                return info
            if time.monotonic() > deadline:
                self.run("scancel", str(job_id), check=False)
                raise TimeoutError(
                    f"job {job_id} still {info.get('JobState')} after {timeout:.0f} s\n"
                    + self.logs()
                )
            time.sleep(1)

    def logs(self, lines: int = 40) -> str:
        """The last lines of every daemon log, for failure messages."""
        parts = []
        for path in sorted((self.root / "log").glob("*.log")):
            text = path.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {path.name} (last {lines} lines) ---\n" + "\n".join(text))
        return "\n".join(parts)


def free_ports(count: int) -> list[int]:
    """Distinct TCP ports free on loopback right now (held open together so they differ)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _missing_binaries() -> list[str]:
    return [b for b in BINARIES if not shutil.which(b) and not Path("/usr/sbin", b).exists()]


def _unavailable(reason: str) -> None:
    if os.environ.get("DIVPREC_REQUIRE_SLURM") == "1":
        pytest.fail(f"SLURM required (DIVPREC_REQUIRE_SLURM=1) but unavailable: {reason}")
    pytest.skip(f"local SLURM cluster unavailable: {reason}")


def _ensure_installed() -> None:
    if not _missing_binaries():
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        _unavailable(f"{', '.join(_missing_binaries())} not installed (run tools/install_slurm.sh)")
    proc = subprocess.run(
        ["bash", str(INSTALL_SCRIPT)], capture_output=True, text=True, timeout=900
    )
    if proc.returncode != 0 or _missing_binaries():
        _unavailable(f"tools/install_slurm.sh failed:\n{proc.stdout}{proc.stderr}")


def _slurm_conf(root: Path, host: str, ports: list[int]) -> str:
    ctld_port, *node_ports = ports
    nodes = "\n".join(
        f"NodeName={name} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} CPUs=1 "
        "RealMemory=1000 State=UNKNOWN"
        for name, port in zip(NODES, node_ports, strict=True)
    )
    return f"""\
# Written by tests/integration/slurm_cluster.py: two emulated nodes on one host.
ClusterName=divprec-test
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.socket
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
PlugStackConfig={root}/plugstack.conf
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
SwitchType=switch/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
PreemptType=preempt/none
PreemptMode=OFF
JobRequeue=1
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
MessageTimeout=10
InactiveLimit=0
KillWait=15
MinJobAge=3600
MailProg=/bin/true
{nodes}
PartitionName=debug Nodes={",".join(NODES)} Default=YES MaxTime=60 State=UP
"""


def _start(cmd: list[str], env: dict[str, str], what: str, cluster: SlurmCluster) -> None:
    """Start a daemon that forks into the background; fail with the logs when it does not."""
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise RuntimeError(
            f"{what} failed to start ({proc.returncode}): {proc.stdout}{proc.stderr}\n"
            + cluster.logs()
        )


def _read_pid(path: Path, timeout: float = 10) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            return int(path.read_text().split()[0])
        except (FileNotFoundError, ValueError, IndexError):
            time.sleep(0.1)
    raise RuntimeError(f"no pid file {path}")


def _stop(pids: list[int], timeout: float = 15) -> None:
    """SIGTERM the daemons we started (all at once), SIGKILL any that linger."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = [pid for pid in alive if _alive(pid)]
    for pid in alive:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A daemon we started exits as a child of init, not of us: nothing to reap. Zombies count as gone.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1][:1] != "Z"
    except OSError:
        return False


def start_cluster() -> SlurmCluster:
    """Start munged, slurmctld and two slurmd; return when both nodes are idle."""
    if os.name != "posix" or os.geteuid() != 0:
        _unavailable("needs root (munged and slurmd run as root in this test cluster)")
    _ensure_installed()

    # A short path in /tmp: the munge socket path must fit in sun_path, and munged insists that
    # every directory above its socket is world-searchable (pytest's tmp dirs are 0700).
    root = Path(tempfile.mkdtemp(prefix="divprec-slurm-", dir="/tmp"))
    root.chmod(0o755)
    for sub in ("munge", "state", "run", "log", *(f"spool/{n}" for n in NODES)):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "munge").chmod(0o755)
    (root / "plugstack.conf").write_text("")
    host = socket.gethostname().split(".")[0]
    conf = root / "slurm.conf"
    conf.write_text(_slurm_conf(root, host, free_ports(1 + len(NODES))))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    cluster = SlurmCluster(root=root, conf=conf, env=env)

    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    try:
        _start(
            [
                "munged",
                f"--key-file={key}",
                f"--socket={root}/munge/munge.socket",
                f"--pid-file={root}/run/munged.pid",
                f"--seed-file={root}/munge/munged.seed",
                f"--log-file={root}/log/munged.log",
            ],
            env,
            "munged",
            cluster,
        )
        cluster._daemons["munged"] = _read_pid(root / "run" / "munged.pid")
        # -i: ignore any saved state (there is none in a fresh directory).
        _start(["slurmctld", "-i"], env, "slurmctld", cluster)
        cluster._daemons["slurmctld"] = _read_pid(root / "run" / "slurmctld.pid")
        for node in NODES:
            _start(["slurmd", "-N", node], env, f"slurmd -N {node}", cluster)
            cluster._daemons[f"slurmd-{node}"] = _read_pid(root / "run" / f"slurmd-{node}.pid")
        _wait_idle(cluster)
    except BaseException:
        stop_cluster(cluster)
        raise
    return cluster


def _wait_idle(cluster: SlurmCluster) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    states: dict[str, str] = {}
    while time.monotonic() < deadline:
        proc = cluster.run("sinfo", "-h", "-N", "-o", "%N %t", check=False)
        if proc.returncode == 0:
            states = dict(line.split() for line in proc.stdout.splitlines() if line.strip())
            if all(states.get(n) == "idle" for n in NODES):
                return
        time.sleep(0.5)
    raise RuntimeError(
        f"SLURM nodes not idle after {START_TIMEOUT_S} s: {states}\n" + cluster.logs()
    )


def stop_cluster(cluster: SlurmCluster) -> None:
    """Cancel what is left, stop the daemons we started (by pid), remove the directory."""
    if "slurmctld" in cluster._daemons:
        cluster.run("scancel", "--partition", cluster.partition, check=False)
        deadline = time.monotonic() + 30  # let slurmstepd end the jobs' processes
        while time.monotonic() < deadline:
            proc = cluster.run("squeue", "-h", "-o", "%i", check=False)
            if proc.returncode != 0 or not proc.stdout.strip():
                break
            time.sleep(0.5)
    # slurmd and slurmctld first (they talk to munged while shutting down), then munged.
    _stop([cluster._daemons.pop(n) for n in list(cluster._daemons) if n != "munged"])
    if "munged" in cluster._daemons:
        _stop([cluster._daemons.pop("munged")])
    if os.environ.get("DIVPREC_KEEP_SLURM") == "1":
        print(f"[slurm_cluster] kept {cluster.root}")
    else:
        shutil.rmtree(cluster.root, ignore_errors=True)


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """A running two-node local SLURM cluster (see the module docstring)."""
    started = time.monotonic()
    cluster = start_cluster()
    print(f"[slurm_cluster] up in {time.monotonic() - started:.1f} s at {cluster.root}")
    try:
        yield cluster
    finally:
        stop_cluster(cluster)
