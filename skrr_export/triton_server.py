"""A local Triton Inference Server for a model repository: the ``tritonserver`` binary of the nvidia-pytriton wheel.

nvidia-pytriton 0.7.0 ships Triton 2.51.0 with its Python backend only (no ONNX Runtime or TensorRT backend) and one
Python-backend stub per Python version. The server is started from the installed wheel, found through package
metadata: its bundled libraries and this interpreter's libpython on ``LD_LIBRARY_PATH``, a backend folder of our own
(links to the wheel's Python backend and the stub for this Python, which the wheel keeps apart), listening on
127.0.0.1 only. It is stopped by its own process id, and dies with the process that started it.

That stub is built against numpy 1.x: under numpy 2 every tensor reaches model.py as zeros (numbers) or garbage
(BYTES). The models' Python environment (``EXECUTION_ENV_PATH``, ``skrr-export triton --python-env``) must hold
numpy < 2; ``python_env`` (``skrr-export serve --make-env ENV``) makes one that sees this interpreter's packages.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from .errors import ArtifactError, SkrrError, UserError

log = logging.getLogger("skrr_export")

PYTRITON = "nvidia-pytriton"
PYTRITON_VERSION = "0.7.0"
INSTALL = f"pip install --no-deps {PYTRITON}=={PYTRITON_VERSION}"
STUB_NUMPY = "numpy==1.26.4"  # the newest numpy 1.x: what the 2.51 stub reads tensors with


class ServerError(SkrrError):
    """The server did not start, or a model did not load: the message carries the server's own error lines."""

    exit_code = 2


@dataclass(frozen=True)
class ServerFiles:
    binary: Path  # tritonserver
    backend: Path  # the Python backend: libtriton_python.so, triton_python_backend_utils.py
    stub: Path  # triton_python_backend_stub for this interpreter's Python version
    libs: Path  # the shared libraries the wheel bundles (nvidia_pytriton.libs)


def server_files() -> ServerFiles:
    """Where the installed nvidia-pytriton wheel keeps the server; a UserError naming the install command without it."""
    try:
        dist = md.distribution(PYTRITON)
    except md.PackageNotFoundError:
        raise UserError(f"a local Triton server needs the tritonserver binary of {PYTRITON}, which is not installed; "
                        f"install it with: {INSTALL}") from None
    root = Path(str(dist.locate_file("pytriton"))) / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    files = ServerFiles(root / "bin" / "tritonserver", root / "backends" / "python",
                        root / "python_backend_stubs" / version / "triton_python_backend_stub",
                        Path(str(dist.locate_file("nvidia_pytriton.libs"))))
    missing = [p for p in (files.binary, files.backend / "libtriton_python.so", files.stub, files.libs) if not p.exists()]
    if missing:
        raise UserError(f"{PYTRITON} {dist.version} has no {missing[0]} (a Python-backend stub for Python {version} "
                        f"is needed); install {PYTRITON}=={PYTRITON_VERSION}: {INSTALL}")
    return files


def backend_directory(files: ServerFiles, folder: Path) -> Path:
    """``folder/python``: links to the wheel's Python backend and the stub for this Python (Triton runs the stub it
    finds beside libtriton_python.so); the wheel itself is left as installed."""
    python = folder / "python"
    python.mkdir(parents=True, exist_ok=True)
    for source in [*files.backend.glob("*.so"), *files.backend.glob("*.py"), files.stub]:
        link = python / source.name
        if not link.exists():
            link.symlink_to(source)
    return folder


def server_environment(files: ServerFiles) -> dict[str, str]:
    """This process's environment with the wheel's libraries and this interpreter's libpython (the stub links it)
    first on LD_LIBRARY_PATH."""
    paths = [str(files.libs), str(sysconfig.get_config_var("LIBDIR") or Path(sys.base_prefix) / "lib")]
    if os.environ.get("LD_LIBRARY_PATH"):
        paths.append(os.environ["LD_LIBRARY_PATH"])
    return os.environ | {"LD_LIBRARY_PATH": ":".join(paths), "HF_HUB_OFFLINE": "1"}


def free_port() -> int:
    """A TCP port nothing on 127.0.0.1 listens on now (the kernel's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def check_port_free(port: int, flag: str) -> None:
    """Nothing listens on 127.0.0.1:``port`` (else a readiness check could be answered by another server)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            raise UserError(f"port {port} on 127.0.0.1 is in use; pass another {flag}") from None


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the process that started the server dies (Linux PR_SET_PDEATHSIG)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except OSError:
        pass


# ----------------------------------------------------------------------------------------------- the Python environment


def python_env_numpy(env: Path | None) -> str | None:
    """The numpy version the Python backend's models import in ``env`` (None: this interpreter's environment); None
    when it cannot be told (a packed environment, or no interpreter in it)."""
    python = Path(sys.executable) if env is None else env / "bin" / "python"
    if not python.is_file():
        return None
    done = subprocess.run([str(python), "-c", "import numpy; print(numpy.__version__)"], capture_output=True, text=True,
                          timeout=120, env=os.environ | {"PYTHONPATH": ""})
    return done.stdout.strip() if done.returncode == 0 else None


# What this server can load: the Python backend and ensembles of its models (no onnxruntime or tensorrt backend)
LOADABLE = re.compile(r'^\s*(backend:\s*"python"|platform:\s*"ensemble")', re.M)


def check_repository(repo: Path) -> None:
    """Refuse, before starting, a model this server has no backend for, and Python-backend models that would import
    numpy 2 (the 2.51 stub hands them zeros for every input there)."""
    seen: dict[Path | None, str | None] = {}
    for config in sorted(repo.glob("*/config.pbtxt")):
        text = config.read_text()
        loadable = LOADABLE.search(text)
        if loadable is None:
            named = re.search(r'^\s*(?:platform|backend):\s*"([^"]+)"', text, re.M)
            raise UserError(f"{config.parent.name}: the {named.group(1) if named else 'unnamed'} backend is not in the "
                            f"local server ({PYTRITON}'s Triton 2.51 has the Python backend only); write the repository "
                            "with skrr-export triton --backend python")
        if loadable.group(1).startswith("platform"):  # an ensemble: no Python of its own
            continue
        found = re.search(r'key:\s*"EXECUTION_ENV_PATH"\s*value:\s*\{\s*string_value:\s*"([^"]*)"', text)
        env = Path(found.group(1).replace("$$TRITON_MODEL_DIRECTORY", str(config.parent))) if found else None
        if env not in seen:
            seen[env] = python_env_numpy(env)
        version = seen[env]
        if version is not None and int(version.split(".")[0]) >= 2:
            where = f"the environment {env}" if env else f"this Python ({sys.prefix}), which it uses without EXECUTION_ENV_PATH"
            raise UserError(f"{config.parent.name}: the Python-backend stub of {PYTRITON} {PYTRITON_VERSION} (Triton 2.51) "
                            f"reads tensors with numpy 1.x, and {where} has numpy {version}: every input would arrive as "
                            f"zeros; make an environment with skrr-export serve --make-env ENV and write the "
                            "repository with --python-env ENV")


def python_env(folder: Path) -> Path:
    """A virtual environment at ``folder`` that sees this interpreter's packages (transformers, onnxruntime) with
    numpy 1.x of its own in front, for the 2.51 stub; made once, kept when it already answers numpy 1.x."""
    version = python_env_numpy(folder) if (folder / "bin" / "python").is_file() else None
    if version is not None and version.startswith("1."):
        return folder
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", str(folder)], check=True)
    site = Path(sysconfig.get_path("purelib", vars={"base": str(folder), "platbase": str(folder)}))
    done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-compile", "--target", str(site),
                           STUB_NUMPY], capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["pip failed"])[-1]
        raise UserError(f"cannot install {STUB_NUMPY} into {folder} ({last}); pip must reach a package index")
    return folder


# ----------------------------------------------------------------------------------------------- the server


class TritonServer:
    """``tritonserver`` on ``repo``, listening on 127.0.0.1: ``with TritonServer(repo, work) as server: server.url``.
    Every model must load (the server exits otherwise, and the error says which and why)."""

    def __init__(self, repo: Path, work: Path, http_port: int | None = None, grpc_port: int | None = None):
        self.repo, self.work = repo.resolve(), work
        self.http_port, self.grpc_port = http_port or free_port(), grpc_port or free_port()
        self.log_path = work / "tritonserver.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def command(self, files: ServerFiles) -> list[str]:
        return [str(files.binary), "--model-repository", str(self.repo),
                "--backend-directory", str(backend_directory(files, self.work / "backends")),
                "--http-address", "127.0.0.1", "--http-port", str(self.http_port),
                "--grpc-address", "127.0.0.1", "--grpc-port", str(self.grpc_port),
                "--allow-metrics", "false", "--exit-timeout-secs", "10"]

    def start(self, ready_timeout: float = 300.0) -> TritonServer:
        if not self.repo.is_dir():
            raise ArtifactError(f"model repository {self.repo} does not exist; write one with skrr-export triton")
        check_port_free(self.http_port, "--http-port")
        check_port_free(self.grpc_port, "--grpc-port")
        check_repository(self.repo)
        files = server_files()
        self.work.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as out:
            self.process = subprocess.Popen(self.command(files), stdout=out, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, env=server_environment(files),
                                            preexec_fn=_die_with_parent)
        log.info("tritonserver (pid %d) on %s, log %s", self.process.pid, self.repo, self.log_path)
        self.wait_ready(ready_timeout)
        return self

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.url}/v2/health/ready", timeout=2) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout: float) -> None:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while not self.ready():
            if self.process.poll() is not None:
                raise ServerError(f"tritonserver exited with code {self.process.returncode} before it was ready: "
                                  f"{'; '.join(self.errors()) or 'no error line'} (log: {self.log_path})")
            if time.monotonic() > deadline:
                self.stop()
                raise ServerError(f"tritonserver was not ready after {timeout:.0f} s (log: {self.log_path})")
            time.sleep(0.25)

    def errors(self) -> list[str]:
        """The server's error lines (model load failures name the model and the exception)."""
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return []
        return [line.strip() for line in lines if line.startswith("E") or "failed to load" in line][:5]

    def models(self) -> list[dict[str, str]]:
        """The repository index: name, version and state of every model."""
        request = urllib.request.Request(f"http://{self.url}/v2/repository/index", data=b"{}", method="POST")
        with urllib.request.urlopen(request, timeout=10) as response:
            return list(json.loads(response.read()))

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM to our own server's pid, SIGKILL if it has not exited after ``timeout``; its exit code."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return None if process is None else process.returncode
        process.terminate()
        try:
            return process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            return process.wait(timeout)

    def __enter__(self) -> TritonServer:
        return self.start() if self.process is None else self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()


def serve(repo: Path, work: Path, http_port: int, grpc_port: int, ready_timeout: float) -> int:
    """``skrr-export serve``: start the server on ``repo``, say where it listens and what it loaded, and keep it
    until Ctrl-C or SIGTERM; then stop it. The server's exit code."""
    server = TritonServer(repo, work, http_port, grpc_port)

    def terminate(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    # SIGINT too: a shell starts background jobs with SIGINT ignored, and Ctrl-C / kill -INT must still stop it
    previous = {s: signal.signal(s, terminate) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.start(ready_timeout)
        assert server.process is not None
        names = ", ".join(f"{m['name']} ({m.get('state', '?')})" for m in server.models())
        print(f"serving {repo} at http://{server.url} (gRPC {server.grpc_url}), tritonserver pid {server.process.pid}; "
              f"models: {names}; Ctrl-C stops it", flush=True)
        code = server.process.wait()
        print(f"tritonserver exited with code {code} (log: {server.log_path})", flush=True)
        return code
    except KeyboardInterrupt:
        return server.stop() or 0
    finally:
        server.stop()
        for number, handler in previous.items():
            signal.signal(number, handler)
