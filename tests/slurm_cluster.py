"""A real single-node SLURM cluster (munged, slurmctld, slurmd) on this host for tests, stopped by PID at exit.
The helpers here (package install, daemons in the foreground, stopping by PID) also serve two_node_cluster.py."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from distributed import free_port

# Commands we need -> the Debian package that ships them.
REQUIRED = {"sbatch": "slurm-client", "slurmctld": "slurmctld", "slurmd": "slurmd", "munged": "munge"}
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
FAILED_STATES = {"FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
ENDED_STATES = {"COMPLETED", "NODE_FAIL", "PREEMPTED", *FAILED_STATES}
# Inherited SLURM client settings, and this process's own torch.distributed rendezvous, stay out of jobs.
CLIENT_ENV = re.compile(r"^((SLURM|SBATCH|SRUN|SALLOC|SQUEUE|SINFO|SCANCEL)_|(RANK|WORLD_SIZE|LOCAL_RANK|MASTER_ADDR|MASTER_PORT)$)")


class SlurmUnavailable(Exception):
    """Why SLURM cannot be started here (the caller turns it into pytest.skip with this reason)."""


@dataclass
class SlurmCluster:
    workdir: Path
    conf: Path
    env: dict[str, str]  # os.environ without inherited SLURM variables, plus SLURM_CONF: pass to subprocess calls

    def run(self, *args: str, check: bool = True, timeout: float = 60,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """Run a SLURM client command against this cluster (cwd: workdir, so default slurm-N.out files land there);
        `env`: variables added to the cluster's environment for this command (and the job it submits)."""
        result = subprocess.run(args, env={**self.env, **(env or {})}, cwd=self.workdir, capture_output=True,
                                text=True, timeout=timeout)
        if check and result.returncode:
            raise RuntimeError(f"{' '.join(args)} exited {result.returncode}:\n{result.stdout}{result.stderr}")
        return result

    def sbatch(self, script: Path, *options: str, script_args: Sequence[str] = (), wait: bool = False,
               timeout: float = 600, env: dict[str, str] | None = None) -> int:
        """Submit `script` (sbatch `options` before it, `script_args` after) and return its job id; with
        wait=True, return only once the job has ended (within `timeout`). `env`: extra variables the job gets
        (sbatch exports them)."""
        start = time.monotonic()
        result = self.run("sbatch", "--parsable", *options, str(script), *script_args, check=False,
                          timeout=min(timeout, 60), env=env)
        match = re.match(r"(\d+)", result.stdout.strip())
        if match is None:
            raise RuntimeError(f"sbatch {script} exited {result.returncode}:\n{result.stdout}{result.stderr}")
        if wait:
            self.wait_ended(int(match.group(1)), timeout=timeout - (time.monotonic() - start))
        return int(match.group(1))

    def wait_ended(self, job_id: int, timeout: float = 600) -> str:
        """Poll until the job has ended (a requeued one runs again first) and return its final state. (Not
        `sbatch --wait`: it looks after 2, 10, 42 s and then every 32 s, which adds up to half a minute.)"""
        return self.wait_state(job_id, ENDED_STATES, timeout=timeout)

    def job_field(self, job_id: int, name: str) -> str:
        """One field of `scontrol show job`, e.g. JobState, Restarts, ExitCode. A query the controller drops
        (on 2 loaded cores scontrol has died of SIGPIPE mid-request) is asked again, up to 5 times."""
        for attempt in range(5):
            result = self.run("scontrol", "--oneliner", "show", "job", str(job_id), check=attempt == 4)
            if result.returncode == 0:
                break
            time.sleep(1)
        out = result.stdout
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


def ensure_installed(required: dict[str, str] = REQUIRED) -> None:
    """apt-get install the packages (values of `required`) whose commands (its keys) are missing; by default
    those of SLURM and MUNGE."""
    missing = sorted({pkg for cmd, pkg in required.items() if shutil.which(cmd, path=SEARCH_PATH) is None})
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


def write_conf(workdir: Path, name: str, controller: tuple[str, str], nodes: dict[str, str], cpus: int,
               socket_path: Path) -> Path:
    """slurm.conf for a test cluster under `workdir`: slurmctld at `controller` (host name, address), one node
    per `nodes` entry (name -> address) with `cpus` CPUs and a share of half this machine's memory, one
    partition `debug`; scheduling every second, so that tests wait little."""
    mem_mb = next(int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal:")) // 2048
    node_lines = "".join(f"NodeName={node} NodeAddr={address} NodeHostname={node} CPUs={cpus} "
                         f"RealMemory={mem_mb // len(nodes)} State=UNKNOWN\n" for node, address in nodes.items())
    conf = workdir / "slurm.conf"
    conf.write_text(f"""\
ClusterName={name}
SlurmctldHost={controller[0]}({controller[1]})
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={socket_path},cred_expire=5
StateSaveLocation={workdir}/state
SlurmdSpoolDir={workdir}/spool-%n
SlurmctldPidFile={workdir}/run/slurmctld.pid
SlurmdPidFile={workdir}/run/slurmd-%n.pid
SlurmctldLogFile={workdir}/log/slurmctld.log
SlurmdLogFile={workdir}/log/slurmd-%n.log
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
{node_lines}PartitionName=debug Nodes={','.join(nodes)} Default=YES MaxTime=INFINITE State=UP
""")
    return conf


def new_munge_key(munge: Path) -> Path:
    """A fresh random key for one cluster's munged, readable by root only."""
    path = munge / "munge.key"
    key = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.write(key, os.urandom(128))
    os.close(key)
    return path


def munged_command(munge: Path, run: Path) -> list[str]:
    """munged in the foreground on its own socket `munge`/munge.sock, with its own key, seed and PID file."""
    # --force: munged refuses a socket whose ancestor directories are not a+x (pytest's tmp dirs are 0700).
    return [shutil.which("munged", path=SEARCH_PATH) or "munged", "--foreground", "--force",
            f"--socket={munge}/munge.sock", f"--key-file={munge}/munge.key", f"--seed-file={munge}/munged.seed",
            f"--pid-file={run}/munged.pid"]


def start_daemon(name: str, cmd: list[str], workdir: Path) -> subprocess.Popen:
    """Start a daemon in the foreground in its own session, its output in workdir/log/<name>.out."""
    with open(workdir / "log" / f"{name}.out", "ab") as out:
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd=workdir,
                                start_new_session=True)


def cancel_jobs(cluster: SlurmCluster, timeout: float = 30) -> None:
    """Cancel this user's jobs on `cluster` and wait (up to `timeout`) until its queue is empty."""
    with contextlib.suppress(subprocess.TimeoutExpired):
        cluster.run("scancel", f"--user={os.getuid()}", check=False)
        poll(lambda: not cluster.run("squeue", "-h", check=False).stdout.strip(), timeout=timeout)


def daemon_logs(workdir: Path) -> str:
    """The tails of what the daemons printed (in the foreground they copy their log to stderr)."""
    return "\n".join(f"--- {path.name}:\n{path.read_text(errors='replace')[-2000:]}"
                     for path in sorted((workdir / "log").glob("*.out")))


def poll(done: Callable[[], bool], timeout: float, interval: float = 0.25) -> bool:
    """Call `done` until it returns True (-> True) or `timeout` seconds have passed (-> False)."""
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


def stop_daemon(proc: subprocess.Popen, timeout: float = 15) -> str | None:
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
    return None if poll(group_gone, timeout=5) else f"processes in {proc.args[0]}'s group {proc.pid} survive SIGKILL"


@contextlib.contextmanager
def local_slurm(workdir: Path, cpus: int | None = None) -> Iterator[SlurmCluster]:
    """Start munged, slurmctld and slurmd for a one-node cluster (partition `debug`) under `workdir`; stop them at exit."""
    ensure_installed()
    start = time.monotonic()
    workdir = Path(workdir).resolve()
    for sub in ("state", "spool", "log", "run", "munge"):
        (workdir / sub).mkdir(parents=True, exist_ok=True, mode=0o700)
    host = socket.gethostname().split(".")[0]  # what `hostname -s` prints, and what slurmd looks for
    munge = workdir / "munge"
    new_munge_key(munge)
    conf = write_conf(workdir, "freelm-test", (host, "127.0.0.1"), {host: "127.0.0.1"},
                      cpus or len(os.sched_getaffinity(0)), munge / "munge.sock")
    env = {k: v for k, v in os.environ.items() if not CLIENT_ENV.match(k)} | {"SLURM_CONF": str(conf)}
    cluster = SlurmCluster(workdir, conf, env)
    sbin = {name: shutil.which(name, path=SEARCH_PATH) or name for name in ("slurmctld", "slurmd")}
    commands = {  # all in the foreground (logging to stderr too), each in its own session
        "munged": munged_command(munge, workdir / "run"),
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
            procs.append(start_daemon(name, cmd, workdir))
            if name == "munged":
                poll(lambda: failed() or (munge / "munge.sock").exists(), timeout=15)
                if failed() or not (munge / "munge.sock").exists():
                    raise SlurmUnavailable(f"munged did not start:\n{daemon_logs(workdir)}")
        poll(lambda: failed() or node_state() == "idle", timeout=60)
        state = node_state()
        if failed() or state != "idle":
            raise SlurmUnavailable(f"node {host} not idle after {time.monotonic() - start:.0f} s (sinfo: {state!r}, "
                                   f"daemon exit codes: {[proc.poll() for proc in procs]}):\n{daemon_logs(workdir)}")
        print(f"[slurm] cluster up in {time.monotonic() - start:.1f} s ({conf})", flush=True)
        yield cluster
    finally:
        if len(procs) == 3 and procs[1].poll() is None:  # cancel leftover jobs while slurmctld can still do it
            cancel_jobs(cluster)
        if errors := [error for proc in reversed(procs) if (error := stop_daemon(proc))]:
            raise RuntimeError("; ".join(errors))
