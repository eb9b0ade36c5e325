"""What the container test needs around Docker, for a machine that cannot pull images.

Each ``ensure_*`` step is idempotent and cached, so only the first run is slow:

- a Docker engine: the one running, else ``dockerd`` started here (installed from Debian's
  ``docker.io`` when missing and we are root, as ``make setup`` does for Prometheus) and stopped
  again at the end;
- Docker Compose v2: ``docker compose`` or a v2 ``docker-compose`` on PATH, else built once from
  source with the Go toolchain through the Go module proxy into ~/.cache/streamagent/bin;
- a Debian bookworm base image made with ``debootstrap`` and ``docker import``
  (``streamagent-test/debian:bookworm``), since registry images cannot be pulled;
- the Kafka 4.1.1 jars (``streamagent kafka fetch``) for the Kafka stand-in;
- a wheelhouse of the image's Python dependencies (``pip download``, once, into
  ~/.cache/streamagent/wheels), served over http to the image build on the Docker bridge, so
  that a cold image build does not download torch again.

Paths and names can be changed with environment variables (see :class:`Env`). Everything is
reported on stdout with the elapsed time, since a cold run takes many minutes.
"""
from __future__ import annotations

import functools
import hashlib
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "streamagent"
COMPOSE_VERSION = "v2.29.7"  # the newest v2 that builds with the Go toolchains of 2024-2026
T0 = time.monotonic()


def log(msg: str) -> None:
    t = time.monotonic() - T0
    print(f"[containers {int(t // 60):2d}:{int(t % 60):02d}] {msg}", flush=True)


def run(cmd: list[str], *, check: bool = True, capture: bool = True, env: dict | None = None,
        timeout: float | None = None, input: bytes | None = None, cwd: Path | None = None
        ) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=capture, env=env, timeout=timeout, input=input,
                          cwd=cwd)
    if check and proc.returncode != 0:
        out = (proc.stdout or b"").decode(errors="replace") + (proc.stderr or b"").decode(
            errors="replace")
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{out[-4000:]}")
    return proc


def is_root() -> bool:
    return os.geteuid() == 0


def apt_install(*packages: str) -> None:
    if not is_root():
        raise RuntimeError(f"needs {' '.join(packages)}: sudo apt-get install {' '.join(packages)}")
    log(f"apt-get install {' '.join(packages)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    run(["apt-get", "update", "-qq"], env=env)
    run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages], env=env)


# --- the engine --------------------------------------------------------------------------------

@dataclass
class Docker:
    started: subprocess.Popen | None = None  # the dockerd we started, if any

    def stop(self) -> None:
        if self.started is None:
            return
        log(f"stopping the dockerd this test started (pid {self.started.pid})")
        self.started.terminate()
        try:
            self.started.wait(60)
        except subprocess.TimeoutExpired:
            self.started.kill()
            self.started.wait(10)
        self.started = None


def docker_ready() -> bool:
    try:
        return run(["docker", "info", "--format", "{{.ServerVersion}}"], check=False,
                   timeout=20).returncode == 0
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return False


def ensure_docker() -> Docker:
    if docker_ready():
        log("docker engine: already running")
        return Docker()
    if not shutil.which("dockerd") or not shutil.which("docker"):
        apt_install("docker.io")
    if not is_root():
        raise RuntimeError("no Docker engine runs and dockerd needs root: start Docker first")
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / "dockerd.log", "ab") as logf:
        proc = subprocess.Popen(["dockerd"], stdout=logf, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 90
    while not docker_ready():
        if proc.poll() is not None:
            raise RuntimeError(f"dockerd exited with {proc.returncode}; see {CACHE / 'dockerd.log'}")
        if time.monotonic() > deadline:
            proc.terminate()
            raise RuntimeError(f"dockerd did not answer within 90 s; see {CACHE / 'dockerd.log'}")
        time.sleep(1)
    log(f"docker engine: started dockerd (pid {proc.pid}, log {CACHE / 'dockerd.log'})")
    return Docker(started=proc)


# --- compose -----------------------------------------------------------------------------------

def _compose_v2(cmd: list[str]) -> str | None:
    try:
        out = run([*cmd, "version", "--short"], check=False, timeout=30)
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return None
    v = out.stdout.decode().strip()
    if out.returncode != 0 or not v:
        return None
    m = re.match(r"v?(\d+)\.(\d+)", v)
    # dockerfile_inline and build secrets need Compose 2.17+; "dev" is a source build
    if v == "dev" or (m and (int(m[1]), int(m[2])) >= (2, 17)):
        return v
    return None


def ensure_compose() -> list[str]:
    """The command that runs Docker Compose v2 (2.17 or newer)."""
    own = CACHE / "bin" / "docker-compose"
    for cmd in (["docker", "compose"], ["docker-compose"], [str(own)]):
        v = _compose_v2(cmd)
        if v:
            log(f"compose: {' '.join(cmd)} {v}")
            return cmd
    go = shutil.which("go")
    if not go:
        raise RuntimeError("needs Docker Compose v2 (2.17+): install the docker-compose-plugin, "
                           "or Go, from which this test builds it")
    log(f"compose: building Docker Compose {COMPOSE_VERSION} from source with {go} (a few minutes, once)")
    with tempfile.TemporaryDirectory() as gobin:
        env = {**os.environ, "GOBIN": gobin, "CGO_ENABLED": "0"}
        pkg = "github.com/docker/compose/v2"
        run([go, "install", "-trimpath", "-ldflags",
             f"-s -w -X {pkg}/internal.Version={COMPOSE_VERSION}", f"{pkg}/cmd@{COMPOSE_VERSION}"],
            env=env, timeout=1800)
        own.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(Path(gobin) / "cmd"), own)
    v = _compose_v2([str(own)])
    if not v:
        raise RuntimeError(f"the Compose built at {own} does not run")
    log(f"compose: built {own} ({v}); `ln -s {own} ~/.docker/cli-plugins/docker-compose` "
        f"makes it `docker compose`")
    return [str(own)]


# --- images --------------------------------------------------------------------------------------

def image_exists(ref: str) -> bool:
    return run(["docker", "image", "inspect", ref], check=False).returncode == 0


def ensure_base_image(tag: str, mirror: str) -> None:
    """A Debian bookworm base image from debootstrap (minbase) + docker import."""
    if image_exists(tag):
        log(f"base image: {tag} (cached)")
        return
    if not shutil.which("debootstrap"):
        apt_install("debootstrap")
    if not is_root():
        raise RuntimeError("debootstrap needs root")
    log(f"base image: debootstrap bookworm from {mirror} (a minute or two, once)")
    tmp = Path(tempfile.mkdtemp(prefix="streamagent-rootfs-"))
    try:
        run(["debootstrap", "--variant=minbase", "bookworm", str(tmp), mirror], timeout=1800)
        (tmp / "etc/apt/sources.list").write_text(
            f"deb {mirror} bookworm main\n"
            f"deb {mirror} bookworm-updates main\n"
            f"deb {mirror.rstrip('/')}-security bookworm-security main\n")
        for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for p in (tmp / junk).glob("*"):
                if p.is_file():
                    p.unlink()
        tar = subprocess.Popen(["tar", "--numeric-owner", "-C", str(tmp), "-c", "."],
                               stdout=subprocess.PIPE)
        imp = subprocess.run(
            ["docker", "import",
             "--change", "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
             "--change", 'CMD ["bash"]', "-", tag],
            stdin=tar.stdout, capture_output=True)
        tar.stdout.close()
        if tar.wait() != 0 or imp.returncode != 0:
            raise RuntimeError(f"docker import of the debootstrap root failed: {imp.stderr!r}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"base image: {tag} made")


def kafka_libs() -> Path:
    from streamagent.ops.broker import BrokerConfig, ensure_jars

    with tempfile.TemporaryDirectory() as tmp:
        libs = ensure_jars(BrokerConfig(data_dir=Path(tmp)), log=log)
    log(f"kafka jars: {libs}")
    return libs


# --- the wheelhouse ------------------------------------------------------------------------------

def ensure_wheelhouse(where: Path) -> bool:
    """Download the image's dependencies as wheels (once per pyproject.toml). False when the
    host's Python cannot stand in for the image's (Debian bookworm's Python 3.11)."""
    if sys.version_info[:2] != (3, 11):
        log(f"wheelhouse: skipped (host Python {sys.version_info[0]}.{sys.version_info[1]}, the "
            f"image's is 3.11): the image build uses PyPI")
        return False
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    stamp = where / ".dependencies.sha256"  # of the dependency list: what the image installs
    want = hashlib.sha256("\n".join(project["dependencies"]).encode()).hexdigest()
    if stamp.exists() and stamp.read_text() == want:
        log(f"wheelhouse: {where} (cached)")
        return True
    log(f"wheelhouse: pip download into {where} (torch and its CUDA wheels: ~3 GB, once)")
    where.mkdir(parents=True, exist_ok=True)
    run([sys.executable, "-m", "pip", "download", "-q", "-d", str(where), str(ROOT),
         "setuptools>=77"], timeout=3600, cwd=ROOT)
    stamp.write_text(want)
    log("wheelhouse: ready")
    return True


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@dataclass
class WheelServer:
    """The wheelhouse over http on the Docker bridge's gateway address, for `pip --find-links`
    in the image build (BuildKit's RUN steps are on that bridge)."""

    directory: Path
    host: str
    port: int
    server: http.server.ThreadingHTTPServer | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/"

    def start(self) -> "WheelServer":
        handler = functools.partial(_Quiet, directory=str(self.directory))
        self.server = http.server.ThreadingHTTPServer((self.host, self.port), handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


def bridge_gateway() -> str | None:
    """The host's address on Docker's default bridge (where build steps run), e.g. 172.17.0.1."""
    import ipaddress

    out = run(["docker", "network", "inspect", "bridge"], check=False)
    if out.returncode != 0:
        return None
    try:
        net = json.loads(out.stdout)[0]
        cfg = (net.get("IPAM", {}).get("Config") or [{}])[0]
    except (IndexError, ValueError):
        return None
    if cfg.get("Gateway"):
        return cfg["Gateway"]
    dev = (net.get("Options") or {}).get("com.docker.network.bridge.name", "docker0")
    addr = run(["ip", "-4", "-o", "addr", "show", "dev", dev], check=False)
    m = re.search(r"inet (\d+\.\d+\.\d+\.\d+)/", addr.stdout.decode())
    if m:
        return m[1]
    if cfg.get("Subnet"):  # Docker gives the bridge the subnet's first address
        return str(next(ipaddress.ip_network(cfg["Subnet"]).hosts()))
    return None


def host_ca_bundle() -> Path | None:
    """The CA bundle this host's pip trusts (a TLS-intercepting proxy's CA may be in it)."""
    for var in ("PIP_CERT", "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE"):
        if os.environ.get(var) and Path(os.environ[var]).is_file():
            return Path(os.environ[var])
    try:
        out = run([sys.executable, "-m", "pip", "config", "get", "global.cert"], check=False)
        p = Path(out.stdout.decode().strip())
        if out.returncode == 0 and p.is_file():
            return p
    except OSError:
        pass
    p = Path("/etc/ssl/certs/ca-certificates.crt")
    return p if p.is_file() else None


# --- the stack -----------------------------------------------------------------------------------

@dataclass
class Stack:
    """`docker compose` on docker-compose.yml + deploy/compose.test.yml, one project."""

    compose: list[str]
    project: str
    env: dict[str, str]
    profiles: tuple[str, ...] = ("demo",)

    def cmd(self, *args: str) -> list[str]:
        prof = [a for p in self.profiles for a in ("--profile", p)]
        return [*self.compose, "-p", self.project, "-f", str(ROOT / "docker-compose.yml"),
                "-f", str(ROOT / "deploy" / "compose.test.yml"), *prof, *args]

    def __call__(self, *args: str, check: bool = True, timeout: float | None = 1800,
                 capture: bool = True) -> subprocess.CompletedProcess:
        return run(self.cmd(*args), check=check, env=self.env, timeout=timeout, capture=capture,
                   cwd=ROOT)

    def containers(self, service: str) -> list[dict]:
        out = self("ps", "--all", "--format", "json", service).stdout.decode().strip()
        if not out:
            return []
        # one JSON document per line (Compose 2.21+) or one JSON array (older)
        if out.startswith("["):
            return json.loads(out)
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def health(self, container: str) -> str:
        out = run(["docker", "inspect", "--format",
                   "{{if .State.Health}}{{.State.Health.Status}}{{else}}{{.State.Status}}{{end}}",
                   container], check=False)
        return out.stdout.decode().strip()

    def http_get(self, service: str, index: int, url: str) -> tuple[int, str]:
        """GET ``url`` from inside a container of ``service`` (its own loopback)."""
        code = ("import sys, urllib.request, urllib.error\n"
                "try:\n"
                f"    r = urllib.request.urlopen({url!r}, timeout=5); print(r.status); "
                "print(r.read().decode())\n"
                "except urllib.error.HTTPError as e:\n"
                "    print(e.code); print(e.read().decode())\n")
        out = self("exec", "-T", "--index", str(index), service, "python", "-c", code,
                   check=False, timeout=60)
        if out.returncode != 0:
            return 0, (out.stdout + out.stderr).decode(errors="replace")
        status, _, body = out.stdout.decode().partition("\n")
        return int(status), body

    NOTABLE = re.compile(r"CRITICAL|ERROR|Traceback|Error:|Exception|rebalance stuck|"
                         r"Timed out|timed out|wait_empty|Revoking|generation \d|exiting|"
                         r"Worker ready|Crashed")

    def digest(self, service: str, per_container: int = 8, width: int = 170) -> str:
        """For CI, which shows only the end of the output: per container of ``service``, its
        restarts and the last notable lines of its whole log (errors, rebalances, crashes),
        each cut to ``width``."""
        out = []
        for c in self.containers(service):
            name = c.get("Name", "?")
            restarts = run(["docker", "inspect", "--format", "{{.RestartCount}}", name],
                           check=False).stdout.decode().strip()
            log = run(["docker", "logs", name], check=False)
            lines = (log.stdout + log.stderr).decode(errors="replace").splitlines()
            notable = [ln.strip()[:width] for ln in lines if self.NOTABLE.search(ln)]
            out.append(f"{name} ({c.get('State')}, {restarts or '?'} restarts, "
                       f"{len(lines)} log lines, {len(notable)} notable; the last):")
            out += ["  " + ln for ln in notable[-per_container:]]
        return "\n".join(out)

    def logs(self, tail: int = 60, *services: str) -> str:
        out = self("logs", "--no-color", "--tail", str(tail), *services, check=False,
                   timeout=120)
        return (out.stdout + out.stderr).decode(errors="replace")
