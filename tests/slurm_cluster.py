"""A real single-node SLURM cluster (munged, slurmctld, slurmd) on this host for tests, stopped by PID at exit."""

from __future__ import annotations

from collections.abc import Sequence

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

# Commands we need -> the Debian package that ships them.
REQUIRED = {"sbatch": "slurm-client", "slurmctld": "slurmctld", "slurmd": "slurmd", "munged": "munge"}
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
FAILED_STATES = {"FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
# Inherited SLURM client settings, and this process's own torch.distributed rendezvous, stay out of jobs.
CLIENT_ENV = re.compile(r"^((SLURM|SBATCH|SRUN|SALLOC|SQUEUE|SINFO|SCANCEL)_|(RANK|WORLD_SIZE|LOCAL_RANK|MASTER_ADDR|MASTER_PORT)$)")


class SlurmUnavailable(Exception):
    """Why SLURM cannot be started here (the caller turns it into pytest.skip with this reason)."""


@dataclass
class SlurmCluster:
    workdir: Path
    conf: Path
    env: dict[str, str]  # os.environ without inherited SLURM variables, plus SLURM_CONF: pass to subprocess calls

    def run(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        """Run a SLURM client command against this cluster (cwd: workdir, so default slurm-N.out files land there)."""
        result = subprocess.run(args, env=self.env, cwd=self.workdir, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode:
            raise RuntimeError(f"{' '.join(args)} exited {result.returncode}:\n{result.stdout}{result.stderr}")
        return result

    def sbatch(self, script: Path, *options: str, script_args: Sequence[str] = (), wait: bool = False,
               timeout: float = 600) -> int:
        """Submit `script` (sbatch `options` before it, `script_args` after) and return its job id; with
        wait=True, return only once the job has ended."""
        result = self.run("sbatch", "--parsable", *(["--wait"] if wait else []), *options, str(script),
                          *script_args, check=False, timeout=timeout)
        match = re.match(r"(\d+)", result.stdout.strip())
        if match is None:
            raise RuntimeError(f"sbatch {script} exited {result.returncode}:\n{result.stdout}{result.stderr}")
        return int(match.group(1))

    def job_field(self, job_id: int, name: str) -> str:
        """One field of `scontrol show job`, e.g. JobState, Restarts, ExitCode."""
        out = self.run("scontrol", "--oneliner", "show", "job", str(job_id)).stdout
        match = re.search(rf"(?:^|\s){re.escape(name)}=(\S*)", out)
        if match is None:
            raise KeyError(f"no {name}= in `scontrol show job {job_id}`: {out}")
        return match.group(1)

    def job_state(self, job_id: int) -> str:
        return self.job_field(job_id, "JobState")

    def wait_state(self, job_id: int, states: set[str], timeout: float = 300) -> str:
        """Poll until the job is in one of `states`; fail early if it ended in another terminal state."""
        start = time.monotonic()
        while (state := self.job_state(job_id)) not in states:
            if state in FAILED_STATES or time.monotonic() - start > timeout:
                info = self.run("scontrol", "show", "job", str(job_id)).stdout
                raise TimeoutError(f"job {job_id} is {state} after {time.monotonic() - start:.0f} s, "
                                   f"not one of {sorted(states)}:\n{info}")
            time.sleep(0.25)
        return state


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ensure_installed() -> None:
    """apt-get install the SLURM and MUNGE packages when any of their commands is missing."""
    missing = sorted({pkg for cmd, pkg in REQUIRED.items() if shutil.which(cmd, path=SEARCH_PATH) is None})
    if not missing:
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise SlurmUnavailable(f"packages {', '.join(missing)} are missing and cannot be installed "
                               f"({'not root' if os.geteuid() else 'no apt-get'})")
    print(f"[slurm] apt-get install {' '.join(missing)} ...", flush=True)
    start, env = time.monotonic(), {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing]
    result = subprocess.run(install, env=env, capture_output=True, text=True)
    if result.returncode:  # an empty or stale package index: refresh it once
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True)
        result = subprocess.run(install, env=env, capture_output=True, text=True)
    if result.returncode:
        raise SlurmUnavailable(f"apt-get install {' '.join(missing)} failed:\n{result.stdout[-2000:]}{result.stderr}")
    print(f"[slurm] installed in {time.monotonic() - start:.1f} s", flush=True)


def _write_conf(workdir: Path, host: str, cpus: int, socket_path: Path) -> Path:
    mem_mb = next(int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal:")) // 2048
    conf = workdir / "slurm.conf"
    conf.write_text(f"""\
ClusterName=freelm-test
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={socket_path},cred_expire=5
StateSaveLocation={workdir}/state
SlurmdSpoolDir={workdir}/spool
SlurmctldPidFile={workdir}/run/slurmctld.pid
SlurmdPidFile={workdir}/run/slurmd.pid
SlurmctldLogFile={workdir}/log/slurmctld.log
SlurmdLogFile={workdir}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=1
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
MinJobAge=600
KillWait=5
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={mem_mb} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
""")
    return conf


def _logs(workdir: Path) -> str:
    """The tails of what the daemons printed (in the foreground they copy their log to stderr)."""
    return "\n".join(f"--- {path.name}:\n{path.read_text(errors='replace')[-2000:]}"
                     for path in sorted((workdir / "log").glob("*.out")))


def _poll(done: Callable[[], bool], timeout: float, interval: float = 0.25) -> bool:
    """Call `done` until it returns True (-> True) or `timeout` seconds have passed (-> False)."""
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


def _stop(proc: subprocess.Popen, timeout: float = 15) -> str | None:
    """SIGTERM, then SIGKILL after `timeout`; then SIGKILL what is left in its process group (e.g. slurmscriptd).
    Returns a complaint if something survives."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)

    def group_gone() -> bool:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            return True
        return False

    # An orphan stays in the group as a zombie until PID 1 reaps it: allow a few seconds.
    return None if _poll(group_gone, timeout=5) else f"processes in {proc.args[0]}'s group {proc.pid} survive SIGKILL"


@contextlib.contextmanager
def local_slurm(workdir: Path, cpus: int | None = None) -> Iterator[SlurmCluster]:
    """Start munged, slurmctld and slurmd for a one-node cluster (partition `debug`) under `workdir`; stop them at exit."""
    _ensure_installed()
    start = time.monotonic()
    workdir = Path(workdir).resolve()
    for sub in ("state", "spool", "log", "run", "munge"):
        (workdir / sub).mkdir(parents=True, exist_ok=True, mode=0o700)
    host = socket.gethostname().split(".")[0]  # what `hostname -s` prints, and what slurmd looks for
    munge = workdir / "munge"
    key = os.open(munge / "munge.key", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.write(key, os.urandom(128))
    os.close(key)
    conf = _write_conf(workdir, host, cpus or len(os.sched_getaffinity(0)), munge / "munge.sock")
    env = {k: v for k, v in os.environ.items() if not CLIENT_ENV.match(k)} | {"SLURM_CONF": str(conf)}
    cluster = SlurmCluster(workdir, conf, env)
    sbin = {name: shutil.which(name, path=SEARCH_PATH) or name for name in ("munged", "slurmctld", "slurmd")}
    commands = {  # all in the foreground (logging to stderr too), each in its own session
        # --force: munged refuses a socket whose ancestor directories are not a+x (pytest's tmp dirs are 0700).
        "munged": [sbin["munged"], "--foreground", "--force", f"--socket={munge}/munge.sock",
                   f"--key-file={munge}/munge.key", f"--seed-file={munge}/munged.seed",
                   f"--pid-file={workdir}/run/munged.pid"],
        "slurmctld": [sbin["slurmctld"], "-D", "-f", str(conf)],
        "slurmd": [sbin["slurmd"], "-D", "-N", host, "-f", str(conf)],
    }
    procs: list[subprocess.Popen] = []

    def node_state() -> str:
        return cluster.run("sinfo", "-h", "-N", "-n", host, "-o", "%T", check=False).stdout.strip()

    def failed() -> bool:
        return any(proc.poll() is not None for proc in procs)

    try:
        for name, cmd in commands.items():
            with open(workdir / "log" / f"{name}.out", "ab") as out:
                procs.append(subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                              cwd=workdir, start_new_session=True))
            if name == "munged":
                _poll(lambda: failed() or (munge / "munge.sock").exists(), timeout=15)
                if failed() or not (munge / "munge.sock").exists():
                    raise SlurmUnavailable(f"munged did not start:\n{_logs(workdir)}")
        _poll(lambda: failed() or node_state() == "idle", timeout=60)
        state = node_state()
        if failed() or state != "idle":
            raise SlurmUnavailable(f"node {host} not idle after {time.monotonic() - start:.0f} s (sinfo: {state!r}, "
                                   f"daemon exit codes: {[proc.poll() for proc in procs]}):\n{_logs(workdir)}")
        print(f"[slurm] cluster up in {time.monotonic() - start:.1f} s ({conf})", flush=True)
        yield cluster
    finally:
        if len(procs) == 3 and procs[1].poll() is None:  # cancel leftover jobs while slurmctld can still do it
            with contextlib.suppress(subprocess.TimeoutExpired):
                cluster.run("scancel", f"--user={os.getuid()}", check=False)
                _poll(lambda: not cluster.run("squeue", "-h", check=False).stdout.strip(), timeout=30)
        if errors := [error for proc in reversed(procs) if (error := _stop(proc))]:
            raise RuntimeError("; ".join(errors))
