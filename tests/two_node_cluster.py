"""A real two-node SLURM cluster on this one machine, for multi-node tests (as root).

Two network namespaces are the nodes `node1` and `node2` (10.213.47.1 and .2), joined by a bridge on which the
host is 10.213.47.254. Commands run "on" node N through `nodeexec N cmd...`: nsenter into the node's network
namespace, then unshare a UTS and a mount namespace to set the hostname nodeN and bind-mount the node's own
/etc/hosts (`ip netns exec` would remount /sys, which slurmd cannot live with, and would keep the host's
hostname, which resolves to 127.0.0.1 and sends gloo's peers there). Each node runs its own slurmd and sshd;
munged and slurmctld run on the host. The filesystem and the process table stay shared: both nodes see the
same checkout, /tmp and ~/.cache, and `pkill -f` on one node matches processes of the other (DeepSpeed's
pdsh launcher cleans up that way when interrupted: never SIGINT/SIGTERM it in a test; let it end, or kill the
ranks by PID, see `TwoNodeCluster.pids_running`).

Every name this fixture makes starts with `flm2n` (namespaces, bridge, veths, /etc/netns entries), so at start
it can remove what a crashed run of itself left behind without touching anything else. Host daemons are
stopped by PID; what is left inside the namespaces when they are deleted (job steps, ranks, ssh sessions)
was started there by the tests and is killed by PID too.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from slurm_cluster import (CLIENT_ENV, REQUIRED, SEARCH_PATH, SlurmCluster, SlurmUnavailable, cancel_jobs,
                           daemon_logs, ensure_installed, munged_command, new_munge_key, poll, start_daemon,
                           stop_daemon, write_conf)

PREFIX = "flm2n"
NODES = ("node1", "node2")
NAMESPACES = {name: f"{PREFIX}-{name}" for name in NODES}  # node -> network namespace
BRIDGE = f"{PREFIX}-br"
SUBNET = "10.213.47"  # /24, private; nothing outside the namespaces this fixture makes is ever a target
HOST_ADDRESS = f"{SUBNET}.254"
ADDRESSES = {name: f"{SUBNET}.{i}" for i, name in enumerate(NODES, start=1)}
IFNAME = "eth0"  # the node's interface, inside its namespace (GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME)
STATE_FILE = Path(f"/run/{PREFIX}-test.json")  # the host daemons of the running fixture, for crash clean-up
REQUIRED_TWO_NODE = {**REQUIRED, "sshd": "openssh-server", "ssh-keygen": "openssh-client", "pdsh": "pdsh",
                     "ip": "iproute2", "ping": "iputils-ping", "nsenter": "util-linux", "unshare": "util-linux"}

NODEEXEC = f"""\
#!/bin/sh
# nodeexec N cmd...: run cmd on node N of the {PREFIX} test cluster: its network namespace, hostname nodeN,
# its own /etc/hosts (bind-mounted in a private mount namespace).
case "$1" in 1|2) n=$1 ;; *) echo "usage: nodeexec 1|2 command..." >&2; exit 2 ;; esac
shift
exec nsenter --net=/run/netns/{PREFIX}-node$n unshare --uts --mount \\
  sh -c 'mount --bind "/etc/netns/{PREFIX}-node$0/hosts" /etc/hosts && hostname "node$0" && exec "$@"' "$n" "$@"
"""


@dataclass
class TwoNodeCluster(SlurmCluster):
    """SlurmCluster for node1 + node2 (partition `debug`), plus running commands on a node and ssh between them."""

    bin_dir: Path  # nodeexec, and an `ssh` that uses ssh_config: first on PATH for pdsh and deepspeed's ssh check
    ssh_config: Path

    def node_command(self, node: int, *cmd: str) -> list[str]:
        """The argv that runs `cmd` on node `node` (1 or 2)."""
        return [str(self.bin_dir / "nodeexec"), str(node), *cmd]

    def node_env(self, **extra: str) -> dict[str, str]:
        """The cluster's environment with bin_dir first on PATH (ssh, for pdsh and deepspeed), plus `extra`."""
        return {**self.env, "PATH": f"{self.bin_dir}{os.pathsep}{self.env.get('PATH', '')}", **extra}

    def nodeexec(self, node: int, *cmd: str, check: bool = True, timeout: float = 60, cwd: Path | None = None,
                 env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """Run `cmd` on node `node` and wait for it (output captured); env: node_env() plus `env`."""
        result = subprocess.run(self.node_command(node, *cmd), env=self.node_env(**(env or {})),
                                cwd=cwd or self.workdir, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode:
            raise RuntimeError(f"node{node}: {' '.join(cmd)} exited {result.returncode}:\n"
                               f"{result.stdout[-3000:]}{result.stderr[-3000:]}")
        return result

    def pids_running(self, text: str) -> list[int]:
        """PIDs of the processes inside the nodes whose command line contains `text` (to kill ranks by PID)."""
        return [pid for pid in _namespace_pids() if text in _cmdline(pid)]


def _sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if check and result.returncode:
        raise SlurmUnavailable(f"`{' '.join(cmd)}` exited {result.returncode}: {result.stderr.strip()}")
    return result


def _identity(pid: int) -> str | None:
    """PID and start time (clock ticks since boot): names one process, never a later one given the same PID;
    None once it has exited (a zombie included)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else f"{pid}@{fields[19]}"


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def _namespaces() -> set[str]:
    return {line.split()[0] for line in _sh("ip", "netns", "list", check=False).stdout.splitlines() if line.strip()}


def _namespace_pids() -> list[int]:
    """Every process in one of this fixture's network namespaces."""
    present = _namespaces()
    return [int(pid) for ns in NAMESPACES.values() if ns in present
            for pid in _sh("ip", "netns", "pids", ns, check=False).stdout.split()]


def _kill_namespace_processes(timeout: float = 10) -> str | None:
    """SIGKILL everything still running in the nodes; a complaint if some survive."""
    def gone() -> bool:
        pids = [pid for pid in _namespace_pids() if not _is_zombie(pid)]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return not pids

    if poll(gone, timeout=timeout):
        return None
    return f"processes survive SIGKILL in the node namespaces: {[(p, _cmdline(p)) for p in _namespace_pids()]}"


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True  # gone


def _remove_network() -> None:
    """Delete this fixture's namespaces, bridge and /etc/netns entries (each only if present)."""
    present = _namespaces()
    for ns in NAMESPACES.values():
        if ns in present:
            _sh("ip", "netns", "del", ns, check=False)
        shutil.rmtree(Path("/etc/netns") / ns, ignore_errors=True)
    if _sh("ip", "link", "show", BRIDGE, check=False).returncode == 0:
        _sh("ip", "link", "del", BRIDGE, check=False)
    for i in range(1, len(NODES) + 1):  # a veth left on the host side by a setup that failed half-way
        if _sh("ip", "link", "show", f"{PREFIX}-v{i}", check=False).returncode == 0:
            _sh("ip", "link", "del", f"{PREFIX}-v{i}", check=False)


def _clean_leftovers() -> None:
    """Stop and remove what a previous run of this fixture left when it could not clean up (a killed pytest):
    the processes in its namespaces, its host daemons (by the PIDs it recorded, if each still runs the recorded
    command line), its network and /etc/netns entries. A run whose process still lives is not a leftover."""
    state = {}
    if STATE_FILE.exists():
        with contextlib.suppress(ValueError, OSError):
            state = json.loads(STATE_FILE.read_text())
    owner = state.get("owner", {})
    if owner and owner["pid"] != os.getpid() and _identity(owner["pid"]) == owner.get("id"):
        raise SlurmUnavailable(f"another test session (PID {owner['pid']}: {owner['cmdline']}) runs the two-node "
                               f"cluster now ({state.get('workdir')})")
    _kill_namespace_processes()
    for entry in state.get("daemons", []):
        if _identity(entry["pid"]) == entry.get("id"):  # still the process that run started
            with contextlib.suppress(ProcessLookupError):
                os.killpg(entry["pid"], signal.SIGKILL)
    _remove_network()
    _remove_dirs(state.get("made", []))
    STATE_FILE.unlink(missing_ok=True)


def _remove_dirs(paths: list[str]) -> None:
    for path in paths:
        with contextlib.suppress(OSError):
            Path(path).rmdir()  # only if empty


def _record(procs: list[subprocess.Popen], workdir: Path, made: list[str]) -> None:
    """Note in STATE_FILE this process as the cluster's owner, its host daemons and the directories it made."""
    owner = {"pid": os.getpid(), "id": _identity(os.getpid()), "cmdline": _cmdline(os.getpid())}
    daemons = [{"pid": proc.pid, "id": _identity(proc.pid), "cmd": proc.args} for proc in procs]
    STATE_FILE.write_text(json.dumps({"workdir": str(workdir), "owner": owner, "daemons": daemons, "made": made}))


def _make_network(host: str) -> None:
    """Bridge + one veth pair per node; each node gets its /etc/netns/<ns>/hosts (nodeexec mounts it)."""
    taken = _sh("ip", "-o", "-4", "addr", "show", "to", f"{SUBNET}.0/24").stdout.strip()
    routed = _sh("ip", "-o", "-4", "route", "show", "to", "match", f"{SUBNET}.1").stdout
    if taken or any(line.split()[0] != "default" for line in routed.splitlines()):
        raise SlurmUnavailable(f"{SUBNET}.0/24 is already in use on this host:\n{taken}\n{routed}")
    _sh("ip", "link", "add", BRIDGE, "type", "bridge")
    _sh("ip", "addr", "add", f"{HOST_ADDRESS}/24", "dev", BRIDGE)
    _sh("ip", "link", "set", BRIDGE, "up")
    hosts = "127.0.0.1 localhost\n" + "".join(f"{ADDRESSES[n]} {n}\n" for n in NODES) + f"{HOST_ADDRESS} {host}\n"
    for i, node in enumerate(NODES, start=1):
        ns, outside, inside = NAMESPACES[node], f"{PREFIX}-v{i}", f"{PREFIX}-c{i}"
        _sh("ip", "netns", "add", ns)
        _sh("ip", "link", "add", outside, "type", "veth", "peer", "name", inside)
        _sh("ip", "link", "set", inside, "netns", ns)
        _sh("ip", "-n", ns, "link", "set", inside, "name", IFNAME)
        _sh("ip", "-n", ns, "addr", "add", f"{ADDRESSES[node]}/24", "dev", IFNAME)
        _sh("ip", "-n", ns, "link", "set", IFNAME, "up")
        _sh("ip", "-n", ns, "link", "set", "lo", "up")
        _sh("ip", "link", "set", outside, "master", BRIDGE)
        _sh("ip", "link", "set", outside, "up")
        (Path("/etc/netns") / ns).mkdir(parents=True, exist_ok=True)
        (Path("/etc/netns") / ns / "hosts").write_text(hosts)


def _write_ssh(workdir: Path) -> tuple[Path, dict[str, Path]]:
    """A client key authorised on both nodes, a host key, one sshd config per node, the client config and an
    `ssh` wrapper using it in workdir/bin. Returns (client config, node -> sshd config)."""
    ssh = workdir / "ssh"
    ssh.mkdir(mode=0o700, exist_ok=True)
    for key in ("id_ed25519", "host_key"):
        for old in (ssh / key, ssh / f"{key}.pub"):
            old.unlink(missing_ok=True)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(ssh / key)], check=True,
                       capture_output=True)
    shutil.copy(ssh / "id_ed25519.pub", ssh / "authorized_keys")
    config = ssh / "ssh_config"
    config.write_text(f"Host {' '.join(NODES)} {' '.join(ADDRESSES.values())}\n  User root\n"
                      f"  IdentityFile {ssh / 'id_ed25519'}\n  IdentitiesOnly yes\n  BatchMode yes\n"
                      f"  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n")
    wrapper = workdir / "bin" / "ssh"
    wrapper.write_text(f"#!/bin/sh\nexec {shutil.which('ssh') or '/usr/bin/ssh'} -F {config} \"$@\"\n")
    wrapper.chmod(0o755)
    sshd = {}
    for node in NODES:
        sshd[node] = ssh / f"sshd_config_{node}"
        sshd[node].write_text(f"ListenAddress {ADDRESSES[node]}\nHostKey {ssh / 'host_key'}\n"
                              f"PidFile {workdir / 'run' / f'sshd-{node}.pid'}\nPermitRootLogin prohibit-password\n"
                              f"PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n"
                              f"AuthorizedKeysFile {ssh / 'authorized_keys'}\nStrictModes no\nPrintMotd no\n")
    return config, sshd


@contextlib.contextmanager
def two_node_slurm(workdir: Path) -> Iterator[TwoNodeCluster]:
    """Build the two nodes, start munged + slurmctld (host) and slurmd + sshd (each node) under `workdir`; at
    exit cancel the jobs, stop those daemons by PID, kill what still runs in the nodes and remove the network."""
    if os.geteuid() != 0:
        raise SlurmUnavailable("a two-node cluster needs root (network namespaces, a bridge, /etc/netns)")
    ensure_installed(REQUIRED_TWO_NODE)
    _clean_leftovers()
    start = time.monotonic()
    workdir = Path(workdir).resolve()
    for sub in ("state", "log", "run", "munge", "bin"):
        (workdir / sub).mkdir(parents=True, exist_ok=True, mode=0o700)
    (workdir / "bin").chmod(0o755)
    host = socket.gethostname().split(".")[0]  # `hostname -s`: what slurmctld looks for in SlurmctldHost
    munge = workdir / "munge"
    new_munge_key(munge)
    conf = write_conf(workdir, "freelm-2node", (host, HOST_ADDRESS), ADDRESSES, len(os.sched_getaffinity(0)),
                      munge / "munge.sock")
    nodeexec = workdir / "bin" / "nodeexec"
    nodeexec.write_text(NODEEXEC)
    nodeexec.chmod(0o755)
    ssh_config, sshd_configs = _write_ssh(workdir)
    env = {k: v for k, v in os.environ.items() if not CLIENT_ENV.match(k)} | {"SLURM_CONF": str(conf)}
    cluster = TwoNodeCluster(workdir, conf, env, workdir / "bin", ssh_config)
    sbin = {name: shutil.which(name, path=SEARCH_PATH) or name for name in ("slurmctld", "slurmd", "sshd")}
    host_procs: list[subprocess.Popen] = []  # munged, slurmctld
    node_procs: list[subprocess.Popen] = []  # slurmd and sshd of each node
    made = [path for path in ("/etc/netns", "/run/sshd") if not Path(path).exists()]  # removed at exit if empty

    def failed() -> bool:
        return any(proc.poll() is not None for proc in host_procs + node_procs)

    def node_states() -> dict[str, str]:
        out = cluster.run("sinfo", "-h", "-N", "-o", "%N %T", check=False).stdout.split()
        return dict(zip(out[::2], out[1::2]))

    def ssh_works() -> bool:
        result = cluster.nodeexec(1, "ssh", "node2", "hostname", check=False, timeout=20)
        return failed() or result.stdout.strip() == "node2"

    _record(host_procs, workdir, made)  # from here on, a killed session leaves what the next one cleans up
    try:
        _make_network(host)
        # sshd insists on its privilege separation directory
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        for node in NODES:  # the nodes reach each other and the host before anything listens
            for target in [*ADDRESSES.values(), HOST_ADDRESS]:
                ping = cluster.nodeexec(int(node[-1]), "ping", "-c", "1", "-W", "5", target, check=False)
                if ping.returncode:
                    raise SlurmUnavailable(f"{node} cannot reach {target}:\n{ping.stdout}{ping.stderr}")
        host_procs.append(start_daemon("munged", munged_command(munge, workdir / "run"), workdir))
        _record(host_procs, workdir, made)
        poll(lambda: failed() or (munge / "munge.sock").exists(), timeout=15)
        if failed() or not (munge / "munge.sock").exists():
            raise SlurmUnavailable(f"munged did not start:\n{daemon_logs(workdir)}")
        host_procs.append(start_daemon("slurmctld", [sbin["slurmctld"], "-D", "-f", str(conf)], workdir))
        _record(host_procs, workdir, made)
        for i, node in enumerate(NODES, start=1):
            node_procs.append(start_daemon(f"slurmd-{node}", cluster.node_command(
                i, sbin["slurmd"], "-D", "-N", node, "-f", str(conf)), workdir))
            node_procs.append(start_daemon(f"sshd-{node}", cluster.node_command(
                i, sbin["sshd"], "-D", "-e", "-f", str(sshd_configs[node])), workdir))
        poll(lambda: failed() or set(node_states().values()) == {"idle"} and len(node_states()) == 2, timeout=60)
        states = node_states()
        if failed() or states != {node: "idle" for node in NODES}:
            raise SlurmUnavailable(f"nodes not idle after {time.monotonic() - start:.0f} s (sinfo: {states}, daemon "
                                   f"exit codes: {[p.poll() for p in host_procs + node_procs]}):\n{daemon_logs(workdir)}")
        if not poll(ssh_works, timeout=30) or failed():
            result = cluster.nodeexec(1, "ssh", "node2", "hostname", check=False, timeout=20)
            raise SlurmUnavailable(f"ssh node1 -> node2 fails: {result.stdout}{result.stderr}\n{daemon_logs(workdir)}")
        print(f"[slurm] two-node cluster up in {time.monotonic() - start:.1f} s ({conf})", flush=True)
        yield cluster
    finally:
        errors = []
        if len(host_procs) == 2 and host_procs[1].poll() is None:  # cancel jobs while slurmctld can still do it
            cancel_jobs(cluster)
        errors += [error for proc in reversed(node_procs) if (error := stop_daemon(proc))]
        if error := _kill_namespace_processes():  # ranks started over ssh, stray job steps
            errors.append(error)
        errors += [error for proc in reversed(host_procs) if (error := stop_daemon(proc))]
        _remove_network()
        _remove_dirs(made)
        STATE_FILE.unlink(missing_ok=True)
        if errors:
            raise RuntimeError("; ".join(errors))
