"""A real Slurm cluster on this one machine, for the Slurm launch tests: one ``slurmctld`` and two
``slurmd`` (nodes ``n1``, ``n2``, both on localhost), with ``munged`` for authentication and
``slurmdbd`` on an embedded MariaDB for ``sacct``.

Debian's ``slurm-wlm``, ``slurmdbd``, ``munge`` and ``mariadb-server`` (``.ci/run`` installs them);
daemons run as root (munged and slurmd need it): this process's user if root, else through
password-less ``sudo -n``. Everything lives in one temporary directory and
is stopped on exit; nothing outside it is written except munged's socket, which it starts only if no
munged is running::

    with SlurmCluster(tmp_path) as cluster:
        job = cluster.submit(script_path)        # sbatch, with SLURM_CONF pointing here
        cluster.wait(job, {"COMPLETED"})         # polls scontrol
        cluster.sacct(job)                        # [(job id, state), ...]
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

TOOLS = ("slurmctld", "slurmd", "slurmdbd", "sbatch", "sacct", "munged", "mariadbd")
INSTALL = "apt-get install slurm-wlm slurmdbd munge mariadb-server (.ci/run installs them)"


def missing_tools() -> list[str]:
    paths = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    return [t for t in TOOLS if shutil.which(t, path=paths) is None]


def can_be_root() -> bool:
    return os.geteuid() == 0 or subprocess.run(["sudo", "-n", "true"], capture_output=True).returncode == 0


def _as_root(cmd: list[str], env: dict | None = None) -> list[str]:
    if os.geteuid() == 0:
        return cmd
    return ["sudo", "-n", "env", *(f"{k}={v}" for k, v in (env or {}).items()), *cmd]


def _which(name: str) -> str:
    return shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") or name


class SlurmCluster:
    def __init__(self, root: Path, cpus_per_node: int = 2, dbd_port: int | None = None,
                 ctld_port: int | None = None):
        from tests.conftest import free_port

        self.root = Path(root)
        self.cpus = cpus_per_node
        self.ctld_port = ctld_port or free_port()
        self.dbd_port = dbd_port or free_port()
        self.conf = self.root / "slurm.conf"
        self.procs: list[subprocess.Popen] = []
        self.pids: list[Path] = []

    @property
    def env(self) -> dict:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    # --- bring-up --------------------------------------------------------------------------------
    def __enter__(self) -> SlurmCluster:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _start(self) -> None:
        r = self.root
        for d in ("state", "spool-n1", "spool-n2", "db", "log"):
            (r / d).mkdir(parents=True, exist_ok=True)
        self._start_munge()
        self._start_database()
        (r / "slurmdbd.conf").write_text(
            f"AuthType=auth/munge\nDbdHost=localhost\nDbdPort={self.dbd_port}\nSlurmUser=root\n"
            f"LogFile={r}/log/slurmdbd.log\nPidFile={r}/slurmdbd.pid\nStorageType=accounting_storage/mysql\n"
            f"StorageHost=127.0.0.1\nStoragePort={self.db_port}\nStorageUser=root\nStorageLoc=slurm_acct\n")
        os.chmod(r / "slurmdbd.conf", 0o600)
        if os.geteuid() != 0:  # slurmdbd wants its file owned by SlurmUser (root)
            subprocess.run(_as_root(["chown", "root:root", str(r / "slurmdbd.conf")]), check=True)
        self.conf.write_text(f"""\
ClusterName=speechtest
SlurmctldHost=localhost
SlurmctldPort={self.ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# A requeued job may start once its credentials expire (default 120 s): the test's requeues wait 10 s.
AuthInfo=cred_expire=10
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool-%n
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd-%n.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd-%n.log
ProctrackType=proctrack/pgid
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort={self.dbd_port}
JobRequeue=1
KillWait=60
InactiveLimit=0
MinJobAge=600
NodeName=n[1-2] NodeHostname=localhost Port=[17001-17002] CPUs={self.cpus} RealMemory=4000 State=UNKNOWN
PartitionName=debug Nodes=n[1-2] Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
""")
        self._daemon([_which("slurmdbd"), "-D"], "slurmdbd")  # reads slurmdbd.conf beside SLURM_CONF
        self._wait_for(lambda: self._port_open(self.dbd_port), "slurmdbd", r / "log/slurmdbd.log")
        self._run([_which("sacctmgr"), "-i", "add", "cluster", "speechtest"], check=False)
        self._daemon([_which("slurmctld"), "-D", "-i", "-f", str(self.conf)], "slurmctld")
        self._wait_for(lambda: self._run([_which("scontrol"), "ping"], check=False).returncode == 0,
                       "slurmctld", r / "log/slurmctld.log")
        for node in ("n1", "n2"):
            self._daemon([_which("slurmd"), "-D", "-N", node, "-f", str(self.conf)], f"slurmd-{node}")
        self._wait_for(self._nodes_idle, "slurmd n1 and n2", r / "log/slurmd-n1.log", timeout_s=60)

    def _start_munge(self) -> None:
        if subprocess.run(["pgrep", "-x", "munged"], capture_output=True).returncode == 0:
            return
        subprocess.run(_as_root(["install", "-d", "-o", "munge", "-g", "munge", "/run/munge"]), check=True)
        # Runs as the munge user (Debian's key belongs to it); left running for later clusters.
        subprocess.run(_as_root(["runuser", "-u", "munge", "--", _which("munged")]), check=True)

    def _start_database(self) -> None:
        from tests.conftest import free_port

        self.db_port = free_port()
        data = self.root / "db"
        subprocess.run(_as_root([_which("mariadb-install-db"), "--no-defaults", f"--datadir={data}", "--user=root",
                        "--auth-root-authentication-method=normal", "--skip-test-db"]),
                       check=True, capture_output=True)
        self._daemon([_which("mariadbd"), "--no-defaults", f"--datadir={data}", "--user=root",
                      f"--port={self.db_port}", "--bind-address=127.0.0.1", f"--socket={data}/mysql.sock",
                      f"--pid-file={data}/mariadb.pid", "--skip-name-resolve"], "mariadb")
        self._wait_for(lambda: self._port_open(self.db_port), "mariadb", self.root / "log/mariadb.log")

    def _daemon(self, cmd: list[str], name: str) -> None:
        log = open(self.root / "log" / f"{name}.out", "w")
        self.procs.append(subprocess.Popen(_as_root(cmd, {"SLURM_CONF": str(self.conf)}), stdout=log,
                                           stderr=subprocess.STDOUT, env=self.env, start_new_session=True))

    @staticmethod
    def _port_open(port: int) -> bool:
        import socket

        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    def _nodes_idle(self) -> bool:
        out = self._run([_which("sinfo"), "-h", "-N", "-o", "%N %t"], check=False).stdout.split("\n")
        return sorted(line.split()[0] for line in out if line.endswith("idle")) == ["n1", "n2"]

    def _wait_for(self, ready, what: str, log: Path, timeout_s: float = 30) -> None:
        deadline = time.monotonic() + timeout_s
        while not ready():
            dead = [p for p in self.procs if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                logs = "\n".join(f"--- {p.name}\n{p.read_text()[-1500:]}" for p in sorted((self.root / "log").iterdir()))
                raise RuntimeError(f"{what} did not come up ({'a daemon exited' if dead else 'timeout'}):\n{logs}")
            time.sleep(0.3)

    def _run(self, cmd: list[str], check: bool = True, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True, check=check, **kw)

    def stop(self) -> None:
        if self.conf.exists():
            self._run([_which("scancel"), "--full", "--user=root"], check=False)
        for proc in reversed(self.procs):
            if proc.poll() is None:
                self._kill(proc, signal.SIGTERM)
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self._kill(proc, signal.SIGKILL)
                proc.wait()
        self.procs.clear()

    @staticmethod
    def _kill(proc: subprocess.Popen, sig: int) -> None:
        if os.geteuid() == 0:
            os.killpg(proc.pid, sig)
        else:  # its process group belongs to root
            subprocess.run(["sudo", "-n", "kill", f"-{int(sig)}", f"-{proc.pid}"], capture_output=True)

    # --- jobs ------------------------------------------------------------------------------------
    def submit(self, script: Path, *args: str, cwd: Path | None = None) -> int:
        out = self._run([_which("sbatch"), "--parsable", *args, str(script)], cwd=cwd).stdout.strip()
        return int(out.split(";")[0])

    def job(self, job_id: int) -> dict:
        """``scontrol show job`` as a dict (JobState, Restarts, ...); {} once it is gone."""
        proc = self._run([_which("scontrol"), "show", "job", "-o", str(job_id)], check=False)
        fields = {}
        for token in proc.stdout.split():
            key, _, value = token.partition("=")
            fields.setdefault(key, value)
        return fields

    def wait(self, job_id: int, states: set[str], timeout_s: float = 600, poll_s: float = 1.0) -> dict:
        deadline = time.monotonic() + timeout_s
        while True:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} not in {states} after {timeout_s} s: {info}")
            time.sleep(poll_s)

    def sacct(self, job_id: int) -> list[tuple[str, str]]:
        """(job id or step, state) rows of every attempt, requeued ones included (``--duplicates``)."""
        out = self._run([_which("sacct"), "-j", str(job_id), "--duplicates", "-n", "-P", "-o", "JobID,State"],
                        check=False).stdout
        return [tuple(line.split("|")[:2]) for line in out.splitlines() if line.strip()]
