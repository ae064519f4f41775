"""`vsal serve`: a local Triton Inference Server on 127.0.0.1 for a model package (torch-free).

The server is a full Triton install (`tritonserver` on PATH) where there is one, else the Triton
server bundled in the `nvidia-pytriton` wheel (Triton 2.51, Python backend only, runs on a CPU
machine): from an installed `nvidia-pytriton`, or from its wheel, downloaded once with
`pip download --no-deps` into `$VSAL_CACHE/triton` (nvidia-pytriton's own Python package pins
numpy < 2, so it is not an install requirement of vsal: only its server binaries are used).

The bundled Python backend stub loads the interpreter's shared libpython, so its folder goes on
LD_LIBRARY_PATH (a pyenv Python keeps it in its own lib folder), and the stub adds this Python's
site-packages (VSAL_SITE_DIRS) so that the models import vsal, numpy and ONNX Runtime from here.

A package folder is served from a temporary repository (python flavor, package files symlinked),
removed when the server stops; a folder written by `vsal-export triton` is served as it is.

Supervision: Triton runs in its own process group with a parent-death signal (SIGKILL when the
`vsal serve` thread that started it dies, SIGKILL of `vsal serve` included: start it from a thread
that lives as long as the server, the main thread in `vsal serve`); its Python backend
stubs leave when Triton does (their own parent check, and a watchdog in vsal's model files). Their
shared-memory regions carry `vsal serve`'s pid in their name: regions of a `vsal serve` that no
longer runs are removed at start, and so are its temporary folders (`vsal-serve-PID-*`: the
repository, the log, uploads). A stop tells the orchestrator (VSAL_STOP_FILE) to end the
generations in flight, gives Triton a few seconds, then kills its process group; a member that
SIGKILL does not end within seconds (uninterruptible sleep in the kernel) is named and left.
"""

from __future__ import annotations

import errno
import fcntl
import glob
import importlib.util
import os
import re
import shutil
import signal
import site
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from stat import S_ISDIR

from vsal.runtime.errors import VsalError
from vsal.runtime.limits import PORTS
from vsal.runtime.serving.triton_repo import RepoOptions, is_repository, write_repository

PYTRITON = "nvidia-pytriton==0.7.0"  # bundles Triton 2.51
START_TIMEOUT_S = 120.0
EXIT_TIMEOUT_S = 5  # Triton's wait for requests in flight (the orchestrator ends them at the next token)
KILL_AFTER_S = EXIT_TIMEOUT_S + 5.0  # then the process group is killed
STUB_EXIT_S = 3.0  # stubs that outlive Triton notice within a second (their parent check)
KILLED_EXIT_S = 5.0  # a process still there this long after SIGKILL is stuck in the kernel: left
SHM_PREFIX = "vsal_serve_"  # + pid of `vsal serve` + "_": its Python backend's shared-memory regions
WORKDIR_PREFIX = "vsal-serve-"  # + pid of `vsal serve` + "-": its temporary folder, in the temp dir
SHM_DIR = Path("/dev/shm")
# Runs Triton with a parent-death signal: prctl(PR_SET_PDEATHSIG, SIGKILL), which execve keeps, then
# exec (a launcher instead of preexec_fn, which is unsafe in a process with threads). argv: the
# expected parent's pid (gone already: exit), then Triton's command line.
_LAUNCH = """
import ctypes, os, signal, sys
PR_SET_PDEATHSIG = 1
if ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
    sys.exit("vsal: prctl(PR_SET_PDEATHSIG) failed")
if os.getppid() != int(sys.argv[1]):
    sys.exit(1)
os.execv(sys.argv[2], sys.argv[2:])
"""


class ServeError(VsalError):
    """A server that cannot be found, started or reached: says why and what to do."""


@dataclass
class TritonInstall:
    binary: Path
    description: str
    bundle: Path | None = None  # the pytriton `tritonserver` folder (backends, python stubs)
    lib_dirs: list[Path] = field(default_factory=list)

    @property
    def python_only(self) -> bool:
        return self.bundle is not None


def cache_dir() -> Path:
    root = os.environ.get("VSAL_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "vsal") / "triton"


def _bundle_at(root: Path, libs: Path, where: str) -> TritonInstall | None:
    binary = root / "tritonserver" / "bin" / "tritonserver"
    if not binary.is_file():
        return None
    return TritonInstall(
        binary, f"Triton 2.51 bundled in nvidia-pytriton ({where})", root / "tritonserver", [libs]
    )


def find_triton(fetch: bool = True, quiet: bool = False) -> TritonInstall:
    """`tritonserver` on PATH, else the nvidia-pytriton bundle (installed, cached, or fetched now)."""
    exe = shutil.which("tritonserver")
    if exe:
        return TritonInstall(Path(exe), f"Triton at {exe}")
    spec = importlib.util.find_spec("pytriton")
    if spec is not None and spec.origin:
        root = Path(spec.origin).parent
        found = _bundle_at(root, root.parent / "nvidia_pytriton.libs", f"installed, {root}")
        if found:
            return found
    unpacked = cache_dir() / PYTRITON.replace("==", "-")
    found = _bundle_at(unpacked / "pytriton", unpacked / "nvidia_pytriton.libs", f"cached, {unpacked}")
    if found:
        return found
    if not fetch:
        raise ServeError("no Triton server: install one (tritonserver on PATH) or nvidia-pytriton")
    _fetch_bundle(unpacked, quiet)
    found = _bundle_at(unpacked / "pytriton", unpacked / "nvidia_pytriton.libs", f"cached, {unpacked}")
    if not found:
        raise ServeError(f"{unpacked}: the {PYTRITON} wheel holds no tritonserver binary")
    return found


def _fetch_bundle(dest: Path, quiet: bool) -> None:
    """Download the nvidia-pytriton wheel (no dependencies) and unpack its server into dest."""
    if not quiet:
        print(f"vsal: fetching the Triton server bundled in {PYTRITON} (once, into {dest})", file=sys.stderr)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".fetch-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check"]
        cmd += ["--only-binary", ":all:", "-d", tmp, PYTRITON]
        proc = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or len(wheels) != 1:
            lines = [ln for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
            reason = lines[-1] if lines else f"pip exited with {proc.returncode}"
            raise ServeError(
                f"could not download {PYTRITON} ({reason}); install Triton (tritonserver on PATH) "
                "or nvidia-pytriton, or point VSAL_CACHE at a folder that holds the unpacked bundle"
            )
        staging = Path(tmp) / "unpacked"
        with zipfile.ZipFile(wheels[0]) as wheel:
            for member in wheel.infolist():
                if not member.filename.startswith(("pytriton/tritonserver/", "nvidia_pytriton.libs/")):
                    continue
                target = staging / member.filename
                wheel.extract(member, staging)
                mode = (member.external_attr >> 16) & 0o777
                if mode:
                    target.chmod(mode)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(staging, dest)


def libpython_dir() -> Path:
    """The folder of this interpreter's shared libpython (what the Python backend stub loads)."""
    libdir = sysconfig.get_config_var("LIBDIR")
    name = sysconfig.get_config_var("INSTSONAME") or sysconfig.get_config_var("LDLIBRARY") or ""
    if not sysconfig.get_config_var("Py_ENABLE_SHARED") or not libdir or not (Path(libdir) / name).exists():
        raise ServeError(
            f"this Python ({sys.executable}) has no shared libpython; Triton's Python backend stub loads "
            f"libpython{sys.version_info[0]}.{sys.version_info[1]}.so: use a Python built with "
            "--enable-shared"
        )
    return Path(libdir)


def python_backend(install: TritonInstall, workdir: Path) -> Path:
    """A backends folder with the bundle's Python backend and the stub for this Python version."""
    assert install.bundle is not None
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    stub = install.bundle / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise ServeError(
            f"{install.bundle}: the bundled Triton has no Python backend stub for Python {version}"
        )
    target = workdir / "backends" / "python"
    target.mkdir(parents=True)
    for item in (install.bundle / "backends" / "python").iterdir():
        shutil.copy2(item, target / item.name)
    shutil.copy2(stub, target / stub.name)
    (target / stub.name).chmod(0o755)
    return workdir / "backends"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def check_port(host: str, port: int) -> None:
    """A ServeError unless host:port is a port number Triton can listen on that nothing holds (else
    the readiness check could find another server there, or wait out its timeout)."""
    low, high = PORTS
    if isinstance(port, bool) or not isinstance(port, int) or not low <= port <= high:
        raise ServeError(f"--port {port!r}: expected a port number from {low} to {high}")
    url = f"{host}:{port}"
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a closed server's TIME_WAIT
        try:
            probe.bind((host, port))
        except socket.gaierror as exc:
            raise ServeError(f"{url}: not an address of this machine ({exc.strerror})") from None
        except OSError as exc:
            reason = {
                errno.EADDRINUSE: "the port is taken",
                errno.EACCES: "a port below 1024 needs root" if port < 1024 else "permission denied",
            }.get(exc.errno, f"the port cannot be used ({exc.strerror})")
            raise ServeError(f"{url}: {reason}; choose another --port") from None
    with socket.socket() as knock:  # a listener bind does not see (another address, a forwarded port)
        knock.settimeout(1.0)
        if knock.connect_ex((host, port)) == 0:
            raise ServeError(f"{url}: another program answers on this port; choose another --port")


class Server:
    """A Triton server for a package or repository, on host:port (gRPC only); a context manager."""

    def __init__(
        self,
        model_dir: str | os.PathLike,
        port: int = 8001,
        host: str = "127.0.0.1",
        options: RepoOptions | None = None,
        quiet: bool = False,
        install: TritonInstall | None = None,
    ):
        self.model_dir = Path(model_dir)
        self.port = port
        self.host = host
        self.options = options
        self.quiet = quiet
        self.install = install
        self.process: subprocess.Popen | None = None
        self.workdir: Path | None = None
        self._alive = None  # the lock that tells other pid namespaces this server runs

    @property
    def url(self) -> str:
        return f"{self.host}:{self.port}"

    def _say(self, message: str) -> None:
        if not self.quiet:
            print(f"vsal: {message}", file=sys.stderr, flush=True)

    def start(self, timeout: float = START_TIMEOUT_S) -> Server:
        check_port(self.host, self.port)
        install = self.install or find_triton(quiet=self.quiet)
        self.install = install
        removed = remove_stale_shm()
        if removed:
            self._say(f"removed {len(removed)} shared-memory regions of servers that no longer run")
        removed = remove_stale_workdirs()
        if removed:
            self._say(f"removed {len(removed)} temporary folders of servers that no longer run")
        env = dict(os.environ)
        lib_dirs = list(install.lib_dirs)
        if install.python_only:
            lib_dirs.append(libpython_dir())
            env["VSAL_SITE_DIRS"] = os.pathsep.join(site.getsitepackages())
        if lib_dirs:
            old = env.get("LD_LIBRARY_PATH")
            env["LD_LIBRARY_PATH"] = os.pathsep.join([*map(str, lib_dirs), *([old] if old else [])])
        self.workdir = Path(tempfile.mkdtemp(prefix=workdir_prefix()))
        self._alive = _hold_alive_lock(self.workdir)
        (self.workdir / "tmp").mkdir()
        env["TMPDIR"] = str(self.workdir / "tmp")  # the models' temporary files go with the server's
        env["VSAL_STOP_FILE"] = str(self.stop_file)
        try:
            self._launch(install, env, timeout)
        except BaseException:
            self.stop()
            raise
        return self

    @property
    def stop_file(self) -> Path:
        """Created when the server stops: the orchestrator then ends its generations in flight."""
        assert self.workdir is not None
        return self.workdir / "stopping"

    def _launch(self, install: TritonInstall, env: dict[str, str], timeout: float) -> None:
        assert self.workdir is not None
        if is_repository(self.model_dir):
            repo = self.model_dir
        else:
            options = self.options or RepoOptions(flavor="python", link=True)
            if install.python_only and options.flavor != "python":
                raise ServeError(
                    f"{install.description} has only the Python backend: serve --flavor python, or "
                    f"install a full Triton (tritonserver on PATH) for --flavor {options.flavor}"
                )
            repo = write_repository(self.model_dir, self.workdir / "repo", options)
        cmd = [
            str(install.binary),
            f"--model-repository={repo}",
            f"--grpc-address={self.host}",
            f"--grpc-port={self.port}",
            "--allow-http=false",
            "--allow-metrics=false",
            "--disable-auto-complete-config",
            f"--exit-timeout-secs={EXIT_TIMEOUT_S}",
            f"--backend-config=python,shm-region-prefix-name={shm_prefix(port=self.port)}",
        ]
        if install.python_only:
            cmd.append(f"--backend-directory={python_backend(install, self.workdir)}")
        self.log = self.workdir / "tritonserver.log"
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", _LAUNCH, str(os.getpid()), *cmd],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # its own process group (its stubs too): killed as one
            )
        self._say(f"starting {install.description}")
        self._wait_ready(timeout)
        self._say(f"serving {self.model_dir} on {self.url} (gRPC; model 'vsal')")

    def _wait_ready(self, timeout: float) -> None:
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException

        deadline = time.monotonic() + timeout
        client = grpcclient.InferenceServerClient(self.url)
        try:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise ServeError(f"the Triton server stopped while starting ({self.failure()})")
                try:
                    if client.is_server_ready() and client.is_model_ready("vsal"):
                        return
                except InferenceServerException:  # not listening yet
                    pass
                time.sleep(0.25)
        finally:
            client.close()
        raise ServeError(f"the Triton server was not ready after {timeout:.0f} s ({self.failure()})")

    def failure(self) -> str:
        """The server log's error lines (or its last lines)."""
        try:
            lines = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return "no log"
        noise = ("CudaDriverHelper", "pinned memory")  # a CPU machine's harmless complaints
        errors = [
            ln.strip()
            for ln in lines
            if (ln.startswith("E") or "error" in ln.lower()) and not any(n in ln for n in noise)
        ]
        return " | ".join((errors or lines)[-2:]) or "no log"

    def stop(self) -> None:
        """Stop the server and remove the temporary files: the orchestrator ends its generations in
        flight, Triton gets SIGINT and EXIT_TIMEOUT_S to finish; after KILL_AFTER_S its process group
        (the Python backend's stubs with it) is killed. Returns once no process of it runs, or with a
        notice naming the processes that SIGKILL did not end within KILLED_EXIT_S."""
        if self.process is not None:
            group = self.process.pid  # start_new_session: the group's id is Triton's pid
            if self.process.poll() is None:
                self._stop_triton(group)
            # stubs that outlive Triton (they release their shared memory as they exit)
            stuck = _end_group(group)
            if stuck:  # said even when quiet: processes of ours are left behind
                print(
                    f"vsal: processes {', '.join(map(str, stuck))} of the Triton server did not end "
                    f"{KILLED_EXIT_S:.0f} s after SIGKILL (stuck in the kernel): left running",
                    file=sys.stderr,
                    flush=True,
                )
            # a stub killed before it released its regions (a slow stop under load) leaves them
            remove_shm(shm_prefix(port=self.port))
        self.process = None
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None
        if self._alive is not None:
            self._alive.close()
            self._alive = None

    def _stop_triton(self, group: int) -> None:
        try:
            self.stop_file.touch()
        except OSError:  # a workdir removed under us: Triton still gets its signal
            pass
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(KILL_AFTER_S)
        except subprocess.TimeoutExpired:
            self._say(f"the Triton server did not stop within {KILL_AFTER_S:.0f} s: killing it")
            _kill_group(group)
            try:
                self.process.wait(KILLED_EXIT_S)
            except subprocess.TimeoutExpired:  # stuck in the kernel: _end_group names it
                pass

    def wait(self) -> int:
        assert self.process is not None
        return self.process.wait()

    def __enter__(self) -> Server:
        return self.start() if self.process is None else self

    def __exit__(self, *exc) -> None:
        self.stop()


def _kill_group(group: int) -> None:
    try:
        os.killpg(group, signal.SIGKILL)
    except ProcessLookupError:  # empty already
        pass


def _end_group(group: int) -> list[int]:
    """Until no process of the group runs: STUB_EXIT_S for its members to exit, then SIGKILL (again
    each poll, for a member that forked meanwhile). Returns the members still there KILLED_EXIT_S
    after the first SIGKILL (uninterruptible sleep: nothing more can end them), else []."""
    killed_at = None
    deadline = time.monotonic() + STUB_EXIT_S
    while members := _group_members(group):
        now = time.monotonic()
        if killed_at is not None and now > killed_at + KILLED_EXIT_S:
            return members
        if now > deadline:
            _kill_group(group)
            killed_at = now if killed_at is None else killed_at
        time.sleep(0.05)
    return []


def _proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state, ppid, pgrp, ...), None when gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _group_members(group: int) -> list[int]:
    """Processes of a process group that run (zombies count as gone), from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = _proc_stat(int(entry.name))
            if stat and stat[0] != "Z" and int(stat[2]) == group:
                found.append(int(entry.name))
    return found


def shm_prefix(pid: int | None = None, port: int | None = None) -> str:
    """The name prefix of the Python backend's shared-memory regions of the `vsal serve` of pid
    (this process by default); with its port, that one server's (a process may run several)."""
    prefix = f"{SHM_PREFIX}{os.getpid() if pid is None else pid}_"
    return prefix if port is None else f"{prefix}{port}_"


def remove_shm(prefix: str, folder: Path = SHM_DIR) -> list[str]:
    """Remove the regions whose names start with prefix (a stopped server's own); their names."""
    removed = []
    for entry in folder.glob(f"{glob.escape(prefix)}*") if folder.is_dir() else ():
        try:
            entry.unlink()
        except OSError:  # gone meanwhile
            continue
        removed.append(entry.name)
    return removed


def _stale_entries(folder: Path, prefix: str, separator: str):
    """(entry, lstat) for this user's entries of folder named prefix + pid + separator whose pid
    runs no process (a pid reused since keeps its entries: safe, not exhaustive)."""
    pattern = re.compile(rf"^{re.escape(prefix)}(\d+){re.escape(separator)}")
    try:
        entries = list(folder.iterdir())
    except OSError:  # no such folder: nothing to clean
        return
    for entry in entries:
        match = pattern.match(entry.name)
        if not match or _proc_stat(int(match.group(1))) is not None:
            continue
        try:
            info = entry.lstat()
        except OSError:  # gone meanwhile
            continue
        if info.st_uid == os.getuid():
            yield entry, info


def remove_stale_shm(folder: Path = SHM_DIR) -> list[str]:
    """Remove this user's regions of `vsal serve` processes that no longer run; their names.
    Regions of any other program are left."""
    removed = []
    for entry, _ in _stale_entries(folder, SHM_PREFIX, "_"):
        try:
            entry.unlink()
        except OSError:  # gone meanwhile, or not ours to remove
            continue
        removed.append(entry.name)
    return removed


def workdir_prefix(pid: int | None = None) -> str:
    """The name prefix of the temporary folders of the `vsal serve` of pid (this process by default)."""
    return f"{WORKDIR_PREFIX}{os.getpid() if pid is None else pid}-"


ALIVE_LOCK = ".alive"  # in a server's workdir: locked for as long as it runs


def _hold_alive_lock(workdir: Path):
    """Lock workdir/.alive for the server's life (the file object holds it; closing releases it)."""
    handle = open(workdir / ALIVE_LOCK, "w")  # noqa: SIM115  (held until stop)
    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return handle


def _alive_elsewhere(workdir: Path) -> bool:
    """Whether a running server holds the workdir's lock (its pid may be in another pid namespace)."""
    try:
        fd = os.open(workdir / ALIVE_LOCK, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:  # none (an older server's folder) or not a plain file
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def remove_stale_workdirs(folder: str | os.PathLike | None = None) -> list[str]:
    """Remove this user's temporary folders of `vsal serve` processes that no longer run (one killed
    with SIGKILL leaves its own); their names. The rule of remove_stale_shm: our prefix, this
    user's, a pid that runs no process. Their repository links are removed, never followed."""
    folder = Path(folder if folder is not None else tempfile.gettempdir())
    removed = []
    for entry, info in _stale_entries(folder, WORKDIR_PREFIX, "-"):
        if not S_ISDIR(info.st_mode):  # a link or a file: not a folder we made
            continue
        if _alive_elsewhere(entry):  # a server whose pid this namespace cannot see (a container)
            continue
        shutil.rmtree(entry, ignore_errors=True)
        if not entry.exists():
            removed.append(entry.name)
    return removed


def serve_forever(server: Server) -> int:
    """Run until SIGINT/SIGTERM (then stop the server cleanly) or until the server exits."""
    stopping = False

    def handler(signum, frame):
        nonlocal stopping
        stopping = True
        raise KeyboardInterrupt

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.start()
        code = server.wait()
        if not stopping:
            raise ServeError(f"the Triton server exited with code {code} ({server.failure()})")
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        if stopping or server.process is not None:  # a signal during start() too
            server._say("stopping the server")
        server.stop()
