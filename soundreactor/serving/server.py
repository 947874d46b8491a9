"""Start, wait for and stop a `tritonserver` process: process management only, the server is NVIDIA's.

The binary is the one on PATH (NVIDIA's NGC container), else the one in the `nvidia-pytriton` wheel
(`pip install --no-deps nvidia-pytriton==0.7.0`: Triton 2.51.0 with its Python backend). That wheel keeps the
backend stubs apart from the backend, so we point `--backend-directory` at a private folder of three symlinks,
and the stub must load the libpython of the interpreter it serves (LD_LIBRARY_PATH).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import soundreactor
from soundreactor.serving.repository import PACKAGE_ROOT_ENV

SHM_DIR = Path("/dev/shm")
INSTALL_HINT = (
    "install it with `pip install --no-deps nvidia-pytriton==0.7.0` (the server binary only), "
    "or run in NVIDIA's Triton container (nvcr.io/nvidia/tritonserver:24.10-py3)"
)


class ServerError(RuntimeError):
    """tritonserver is missing, failed to start, or did not become ready."""


class PortInUse(ServerError):
    """A port the server needs is taken by another process."""


def find_tritonserver() -> tuple[Path, Path | None]:
    """(binary, pytriton wheel folder or None when the binary is on PATH). Raises ServerError if neither."""
    on_path = shutil.which("tritonserver")
    if on_path:
        return Path(on_path), None
    spec = importlib.util.find_spec("pytriton")  # locates the package without importing it
    if spec is not None and spec.submodule_search_locations:
        wheel = Path(next(iter(spec.submodule_search_locations))) / "tritonserver"
        if (wheel / "bin" / "tritonserver").is_file():
            _stub(wheel)  # fail here, not when a model loads
            _libpython()
            return wheel / "bin" / "tritonserver", wheel
    raise ServerError(
        f"tritonserver is not on PATH and the nvidia-pytriton wheel is not installed: {INSTALL_HINT}"
    )


def _stub(wheel: Path) -> Path:
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = wheel / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise ServerError(f"the nvidia-pytriton wheel has no Python backend stub for Python {version}")
    return stub


def _libpython() -> Path:
    """The shared libpython the stub embeds; Pythons built without --enable-shared have none."""
    name = sysconfig.get_config_var("INSTSONAME") or ""
    path = Path(sysconfig.get_config_var("LIBDIR") or "") / name
    if ".so" not in name or not path.is_file():  # a static build names libpython3.X.a
        raise ServerError(
            f"this Python ({sys.executable}) has no shared libpython, which the wheel's Python backend stub "
            "loads: use a Python built with --enable-shared (pyenv: PYTHON_CONFIGURE_OPTS=--enable-shared), "
            "or NVIDIA's Triton container"
        )
    return path


def _wheel_backends(wheel: Path, into: Path) -> Path:
    """A backend folder whose python/ holds the wheel's backend and the stub for this interpreter."""
    python = into / "python"
    python.mkdir(parents=True)
    backend = wheel / "backends" / "python"
    for target in (backend / "libtriton_python.so", backend / "triton_python_backend_utils.py", _stub(wheel)):
        (python / target.name).symlink_to(target)
    return into


def _wheel_env(wheel: Path) -> dict[str, str]:
    """The stub embeds libpython: this interpreter's first, then the wheel's bundled libraries."""
    libs = [sysconfig.get_config_var("LIBDIR") or "", str(wheel.parents[1] / "nvidia_pytriton.libs")]
    old = os.environ.get("LD_LIBRARY_PATH", "")
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = ":".join(p for p in [*libs, old] if p)
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    return env


class TritonServer:
    """One tritonserver process serving `repo`, bound to `host` (loopback unless told otherwise).

        with TritonServer("repo/", grpc_port=8001) as server:   # returns once every model is ready
            ...                                                 # clients on server.grpc_url
        # stopped: no process of its group left, no shared-memory region of its Python backend left

    `log`: a file for the server's output (None: this process's stdout/stderr).
    """

    def __init__(
        self,
        repo: str | Path,
        host: str = "127.0.0.1",
        http_port: int = 8000,
        grpc_port: int = 8001,
        metrics_port: int = 8002,
        log: str | Path | None = None,
        exit_timeout_s: int = 10,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.repo = Path(repo).resolve()
        if not self.repo.is_dir():
            raise FileNotFoundError(
                f"model repository not found: {repo} (write one with `soundreactor triton-repo`)"
            )
        if not any(p.is_dir() and not p.name.startswith(".") for p in self.repo.iterdir()):
            # tritonserver would start, report ready, and serve nothing
            raise ValueError(
                f"{repo} holds no model: write one into it with `soundreactor triton-repo --out {repo}`"
            )
        self.host, self.exit_timeout_s = host, exit_timeout_s
        self.ports = {"http": http_port, "grpc": grpc_port, "metrics": metrics_port}
        self.log = Path(log) if log else None
        self.extra_args = extra_args
        # our own prefix, so regions a killed server leaves behind can be found and removed
        self.shm_prefix = f"soundreactor_{uuid.uuid4().hex[:12]}_"
        self.process: subprocess.Popen | None = None
        self.last_exit_code: int | None = None
        self._out = None
        self._tmp: tempfile.TemporaryDirectory | None = None

    @property
    def local_host(self) -> str:
        return "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host

    @property
    def grpc_url(self) -> str:
        return f"{self.local_host}:{self.ports['grpc']}"

    @property
    def http_url(self) -> str:
        return f"{self.local_host}:{self.ports['http']}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.local_host}:{self.ports['metrics']}/metrics"

    def command(self) -> tuple[list[str], dict[str, str]]:
        binary, wheel = find_tritonserver()
        args = [str(binary), f"--model-repository={self.repo}", f"--exit-timeout-secs={self.exit_timeout_s}"]
        for kind, port in self.ports.items():
            args += [f"--{kind}-address={self.host}", f"--{kind}-port={port}"]
        args.append(f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}")
        env = dict(os.environ)
        if wheel is not None:
            self._tmp = tempfile.TemporaryDirectory(prefix="soundreactor_backends_")
            args.append(f"--backend-directory={_wheel_backends(wheel, Path(self._tmp.name))}")
            env = _wheel_env(wheel)
        package_root = Path(soundreactor.__file__).resolve().parents[1]
        env[PACKAGE_ROOT_ENV] = str(package_root)  # the served model imports this very soundreactor
        return [*args, *self.extra_args], env

    def start(self, timeout_s: float = 180.0) -> None:
        """Start the server and return once it reports ready (every model loaded); PortInUse if a port is taken,
        ServerError otherwise."""
        self._check_ports()
        args, env = self.command()
        out = self._out = open(self.log, "ab") if self.log else None  # noqa: SIM115 (closed in stop)
        # A session of its own: Ctrl-C in a terminal reaches us only, and we stop the server in order.
        self.process = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT if out else None,
                                        start_new_session=True)  # fmt: skip
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                code = self.stop()  # stop() forgets the process: keep its exit code for the message
                self._check_ports()  # taken after our check, before the server bound it
                raise ServerError(f"tritonserver exited with code {code} while starting{self._log_tail()}")
            if self.ready():
                return
            time.sleep(0.2)
        self.stop()
        raise ServerError(f"tritonserver was not ready within {timeout_s:.0f} s{self._log_tail()}")

    def _check_ports(self) -> None:
        """Bind each port as the server will (SO_REUSEADDR: a closed connection's TIME_WAIT does not count)."""
        for kind, port in self.ports.items():
            family, socktype, proto, _, address = socket.getaddrinfo(
                self.host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )[0]
            with socket.socket(family, socktype, proto) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    probe.bind(address)
                except OSError as err:
                    raise PortInUse(
                        f"the {kind} port {port} on {self.host} cannot be used: {err.strerror} (another server may "
                        f"listen there); stop it, or pick a free port with --{kind}-port"
                    ) from None

    def ready(self) -> bool:
        url = f"http://{self.local_host}:{self.ports['http']}/v2/health/ready"
        try:
            with urllib.request.urlopen(url, timeout=1.0) as reply:
                return reply.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    def stop(self) -> int | None:
        """SIGTERM (Triton finishes in-flight requests, unloads models, frees shared memory), then SIGKILL of
        the whole process group if it takes longer than the exit timeout. Idempotent. Returns the exit code."""
        process, self.process = self.process, None
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(self.exit_timeout_s + 5)
        _kill_group(process.pid)
        process.wait()
        deadline = time.monotonic() + 10  # killed stubs are reaped by init, not by us: give it a moment
        while group_alive(process.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        for region in self.shm_regions():  # only after a kill; a clean exit leaves none
            region.unlink(missing_ok=True)
        if self._out:
            self._out.close()
            self._out = None
        if self._tmp:
            self._tmp.cleanup()
            self._tmp = None
        self.last_exit_code = process.returncode
        return process.returncode

    def shm_regions(self) -> list[Path]:
        return sorted(SHM_DIR.glob(f"{self.shm_prefix}*")) if SHM_DIR.is_dir() else []

    def _log_tail(self, lines: int = 30) -> str:
        if not self.log or not self.log.is_file():
            return ""
        tail = self.log.read_text(errors="replace").splitlines()[-lines:]
        return f"; the end of its log ({self.log}):\n" + "\n".join(tail)

    def __enter__(self) -> TritonServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _kill_group(pgid: int) -> None:
    """SIGKILL whatever is left of the server's process group (Python backend stubs), and reap nothing else."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


def group_alive(pgid: int) -> bool:
    """Whether any process of the group is left (a zombie leader counts until reaped)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True
