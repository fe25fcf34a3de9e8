"""The ``ray`` backend: each worker runs inside a Ray actor, its frames on a direct TCP stream.

Theory of operation
-------------------
One actor per worker (:class:`WorkerActor`, created with the bridge's ``num_cpus``,
``num_gpus``, ``resources`` and ``runtime_env``). The actor does not relay frames: it listens
on its node's address, accepts two connections from the host (frames, stderr), each opened with a
random per-worker token, and starts the ordinary worker runtime (``python -m mlbridge.worker``,
the same bridge code as locally) with the frame socket as its stdin and stdout and the stderr
socket as its stderr. From then on every frame goes host <-> worker over that one TCP stream,
exactly as the ``socketpair`` backend does on one machine; the actor only starts, signals and
waits for its worker (``--parent-pid`` is the actor, and the worker also gets a parent-death
signal, so an actor or node death takes its worker with it).

On the host, :class:`RayTransport` is returned at once; a helper thread per worker does every
blocking Ray step (connecting to the cluster on first use, creating the actor, ``prepare``,
connecting the sockets, learning the worker's pid) and then blocks in ``wait``, whose answer (or
``RayActorError`` when the actor or its node died: reported as ``-SIGKILL``) is the exit status.
Until the sockets are attached, writes are buffered. The exit is reported after the frame stream
reached end of file (or 2 s after the exit, if the network never says so), so every byte the
worker sent comes first; ``consumed`` is None (a remote worker cannot say what it read), so the
host fails, never retries, the calls in flight at a crash.

The cluster: ``[ray] address`` (``"auto"``, ``"ray://head:10001"``, ``"host:port"``), or unset
for a local cluster started on demand (``num_cpus`` from ``[ray]``), without the dashboard and
usage stats. The host calls :func:`configure` with its ``[ray]`` table before the first worker.
Ray is imported only when a ray worker starts, so mlbridge runs without it.

Limits: the host must be able to open TCP connections to the nodes (as a Ray driver on the
cluster's network can; a Ray Client ``ray://`` driver outside it may not), and a worker's
interpreter path is used on the node when it exists there, else the actor's own interpreter
(whose packages come from the bridge's ``runtime_env``).

Secrets: the worker's spec (its settings and environment may hold API keys) travels on the
token-authenticated frame stream, right after the token, never as a Ray task argument (those
are stored and may be logged by Ray).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import os
import secrets
import signal as _signal
import socket
import subprocess
import sys
import threading
from collections.abc import Mapping
from typing import Any

from . import TransportEvents, WorkerSpec, worker_command
from ._stderr import StderrPipe
from .isolation import IsolationError

__all__ = ["RayBackend", "RayTransport", "WorkerActor", "configure", "ensure_ray"]

log = logging.getLogger("mlbridge.ray")

_READ_SIZE = 1 << 18
_TOKEN_BYTES = 32
_ACCEPT_TIMEOUT = 60.0
_EOF_GRACE = 2.0

_cluster: dict[str, Any] = {"address": None, "num_cpus": None, "namespace": "mlbridge"}
_init_lock = threading.Lock()
_remote_cls: list[Any] = []


def configure(
    address: str | None, num_cpus: int | None = None, namespace: str = "mlbridge"
) -> None:
    """The cluster the next :func:`ensure_ray` connects to (the host's ``[ray]`` table)."""
    _cluster.update(address=address, num_cpus=num_cpus, namespace=namespace)


def ensure_ray() -> Any:
    """Connect to (or start) the cluster once per process; returns the ``ray`` module."""
    try:
        import ray
    except ImportError as exc:
        raise OSError(
            "backend = 'ray' needs Ray, which is not installed. Fix: pip install 'mlbridge[ray]'"
        ) from exc
    with _init_lock:
        if not ray.is_initialized():
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
            kwargs: dict[str, Any] = {
                "namespace": _cluster["namespace"],
                "log_to_driver": False,
                "ignore_reinit_error": True,
            }
            address = _cluster["address"]
            if address is None:
                kwargs.update(include_dashboard=False, num_cpus=_cluster["num_cpus"])
            log.info("connecting to Ray at %s", address or "a new local cluster")
            ray.init(address=address, **kwargs)
        if not _remote_cls:
            _remote_cls.append(ray.remote(WorkerActor))
    return ray


# --------------------------------------------------------------------------- the actor


class WorkerActor:
    """Runs one worker process on its node; never touches the frames (see the module doc)."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        self.spawned = threading.Event()
        self.done = threading.Event()
        self.returncode: int | None = None
        self.error: str | None = None

    def prepare(self, token: bytes) -> dict[str, Any]:
        """Listen for the host's two connections; the worker starts once both arrived."""
        import ray

        ip = ray.util.get_node_ip_address()  # type: ignore[no-untyped-call]
        listener = socket.create_server((ip, 0))
        listener.settimeout(_ACCEPT_TIMEOUT)
        port = listener.getsockname()[1]
        threading.Thread(
            target=self._accept_then_spawn, args=(listener, token), daemon=True
        ).start()
        return {
            "ip": ip,
            "port": port,
            "node_id": ray.get_runtime_context().get_node_id(),
            "hostname": socket.gethostname(),
            "actor_pid": os.getpid(),
        }

    def _accept_then_spawn(self, listener: socket.socket, token: bytes) -> None:
        socks: dict[bytes, socket.socket] = {}
        fields: dict[str, Any] = {}
        try:
            with listener:
                while len(socks) < 2:
                    conn, _ = listener.accept()
                    conn.settimeout(10.0)
                    hello = b""
                    while len(hello) < 1 + _TOKEN_BYTES:
                        part = conn.recv(1 + _TOKEN_BYTES - len(hello))
                        if not part:
                            break
                        hello += part
                    kind, got = hello[:1], hello[1:]
                    if kind not in (b"F", b"E") or not hmac.compare_digest(got, token):
                        conn.close()  # not our host: ignore it
                        continue
                    if kind == b"F":  # then the spec, on the authenticated stream only
                        fields = json.loads(_recv_exact(conn, int.from_bytes(_recv_exact(conn, 4))))
                    conn.settimeout(None)
                    socks[kind] = conn
            spec = WorkerSpec(**fields)
            spec = dataclasses.replace(spec, parent_pid=os.getpid())
            argv, env = worker_command(spec)
            if not os.path.exists(argv[0]):  # the host's interpreter is not on this node
                argv[0] = sys.executable
            self.proc = subprocess.Popen(
                argv,
                stdin=socks[b"F"].fileno(),
                stdout=socks[b"F"].fileno(),
                stderr=socks[b"E"].fileno(),
                env=env,
                start_new_session=True,
            )
        except Exception as exc:  # reported through wait()
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            for s in socks.values():
                s.close()
            self.spawned.set()
        # The worker asks for a parent-death signal, which Linux sends when the *thread* that
        # started it ends: so this thread lives as long as the worker.
        if self.proc is not None:
            self.returncode = self.proc.wait()
        self.done.set()

    def started(self) -> int | None:
        """The worker's pid once it runs (None if it could not start)."""
        self.spawned.wait()
        return None if self.proc is None else self.proc.pid

    def wait(self) -> dict[str, Any]:
        self.done.wait()
        if self.proc is None:
            return {"returncode": 1, "error": self.error or "the worker did not start"}
        return {"returncode": self.returncode, "error": None}

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, sig)


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        part = conn.recv(n - len(buf))
        if not part:
            raise ConnectionError("the host closed the connection during the handshake")
        buf += part
    return bytes(buf)


# --------------------------------------------------------------------------- the host side


def _spec_fields(spec: WorkerSpec) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in dataclasses.fields(spec):
        v = getattr(spec, f.name)
        out[f.name] = dict(v) if isinstance(v, Mapping) else v
    out["backend_options"] = {}
    return out


def _actor_options(spec: WorkerSpec) -> dict[str, Any]:
    opts = dict(spec.backend_options)
    out: dict[str, Any] = {
        "num_cpus": float(opts.get("num_cpus", 1.0)),
        "num_gpus": float(opts.get("num_gpus", 0.0)),
        "max_concurrency": 4,  # started/wait/signal run side by side
        "max_restarts": 0,  # the pool replaces a dead worker, Ray must not
    }
    if opts.get("resources"):
        out["resources"] = dict(opts["resources"])
    runtime_env = dict(opts.get("runtime_env") or {})
    packages = opts.get("environment_packages")
    address = _cluster["address"] or ""
    if packages and address.startswith("ray://") and not {"pip", "uv", "conda"} & set(runtime_env):
        # A Ray Client driver is off the cluster, whose nodes cannot see this machine's
        # environment cache: the bridge's packages become the actor's runtime_env (its
        # interpreter runs the worker where the built environment's path does not exist).
        runtime_env["uv"] = list(packages)
    if runtime_env:
        out["runtime_env"] = runtime_env
    return out


class RayTransport:
    def __init__(
        self, spec: WorkerSpec, events: TransportEvents, loop: asyncio.AbstractEventLoop
    ) -> None:
        self.pid: int | None = None  # the worker's pid on its node, once known
        self.node: str | None = None  # the node's hostname and Ray node id, once known
        self.node_id: str | None = None
        self.node_ip: str | None = None
        self.actor: Any = None
        self._spec = spec
        self._events = events
        self._loop = loop
        self._lock = threading.Lock()
        self._pending = bytearray()
        self._written = 0
        self._writer_on = False
        self._input_closed = False
        self._exited = False
        self._eof = False
        self._code: int | None = None
        self._code_known = False
        self._sock: socket.socket | None = None
        self._stderr: StderrPipe | None = None
        self._err_sock: socket.socket | None = None
        self._buf = bytearray(_READ_SIZE)
        self._view = memoryview(self._buf)
        self._token = secrets.token_bytes(_TOKEN_BYTES)
        self._thread = threading.Thread(
            target=self._run, name=f"mlbridge-ray-{spec.worker_id}", daemon=True
        )
        self._thread.start()

    # ------------------------------------------------------------------ helper thread
    def _post(self, fn: Any, *args: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening
            self._loop.call_soon_threadsafe(fn, *args)

    def _run(self) -> None:
        code: int | None
        try:
            ray = ensure_ray()
            self.actor = _remote_cls[0].options(**_actor_options(self._spec)).remote()
            info = ray.get(self.actor.prepare.remote(self._token))
            self.node_id, self.node_ip = info["node_id"], info["ip"]
            self.node = f"{info['hostname']}/{info['node_id'][:12]}"
            socks = []
            for kind in (b"F", b"E"):
                s = socket.create_connection((info["ip"], info["port"]), timeout=30)
                s.sendall(kind + self._token)
                if kind == b"F":  # settings and env may hold secrets: never through Ray
                    blob = json.dumps(_spec_fields(self._spec)).encode()
                    s.sendall(len(blob).to_bytes(4) + blob)
                socks.append(s)
            self.pid = ray.get(self.actor.started.remote())
            self._post(self._attach, socks[0], socks[1])
        except Exception as exc:
            note = f"mlbridge: the Ray actor of {self._spec.worker_id} failed to start: {exc}\n"
            self._post(self._events.stderr_received, note.encode())
            self._post(self._exit_known, 1)
            self._kill_actor()
            return
        try:
            out = ray.get(self.actor.wait.remote())
            code = out["returncode"]
            if out.get("error"):
                self._post(self._events.stderr_received, f"mlbridge: {out['error']}\n".encode())
        except Exception as exc:  # RayActorError: the actor or its node died
            code = -_signal.SIGKILL
            note = f"mlbridge: the Ray actor of {self._spec.worker_id} died: {type(exc).__name__}\n"
            self._post(self._events.stderr_received, note.encode())
        self._post(self._exit_known, code)
        self._kill_actor()

    def _kill_actor(self) -> None:
        if self.actor is not None:
            with contextlib.suppress(Exception):
                import ray

                ray.kill(self.actor, no_restart=True)

    # ------------------------------------------------------------------ loop side
    def _attach(self, sock: socket.socket, err: socket.socket) -> None:
        if self._exited:
            sock.close()
            err.close()
            return
        sock.setblocking(False)
        with self._lock:
            self._sock = sock
            self._err_sock = err
        self._loop.add_reader(sock.fileno(), self._on_readable)
        self._stderr = StderrPipe(err.fileno(), self._events, self._loop)
        with self._lock:
            if self._pending:
                self._start_writer()
            elif self._input_closed:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_WR)

    @property
    def written(self) -> int:
        return self._written

    def write(self, header: bytes, payload: bytes | memoryview) -> None:
        with self._lock:
            if self._input_closed or self._exited:
                raise BrokenPipeError("the worker's stream is closed")
            self._written += len(header) + len(payload)
            if self._sock is None or self._pending:
                self._pending += header
                self._pending += payload
                if self._sock is not None:
                    self._loop.call_soon_threadsafe(self._start_writer_locked)
                return
            try:
                n = self._sock.sendmsg([header, payload])
            except BlockingIOError:
                n = 0
            except OSError as exc:
                raise BrokenPipeError(str(exc)) from exc
            if n >= len(header) + len(payload):
                return
            self._pending += (bytes(header) + bytes(payload))[n:]
            self._loop.call_soon_threadsafe(self._start_writer_locked)

    def _start_writer_locked(self) -> None:
        with self._lock:
            self._start_writer()

    def _start_writer(self) -> None:  # holds _lock
        if not self._writer_on and not self._exited and self._pending and self._sock is not None:
            self._writer_on = True
            self._loop.add_writer(self._sock.fileno(), self._drain)

    def _drain(self) -> None:
        with self._lock:
            sock = self._sock
            if sock is None:
                return
            try:
                n = sock.send(self._pending)
            except BlockingIOError:
                return
            except OSError:
                n = len(self._pending)
            del self._pending[:n]
            if self._pending:
                return
            self._loop.remove_writer(sock.fileno())
            self._writer_on = False
            if self._input_closed:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_WR)

    def close_input(self) -> None:
        with self._lock:
            if self._input_closed:
                return
            self._input_closed = True
            if self._sock is not None and not self._pending and not self._exited:
                with contextlib.suppress(OSError):
                    self._sock.shutdown(socket.SHUT_WR)

    def signal(self, sig: int) -> None:
        if self._exited:
            return
        if self.actor is None:  # not created yet: a kill takes effect as soon as it is
            if sig in (_signal.SIGKILL, _signal.SIGTERM):
                threading.Thread(target=self._kill_soon, daemon=True).start()
            return
        if self.pid is None and sig in (_signal.SIGKILL, _signal.SIGTERM):
            self._kill_actor()  # still being placed or started: nothing to signal but the actor
            return
        try:
            self.actor.signal.remote(sig)
        except Exception:
            self._kill_actor()

    def _kill_soon(self) -> None:
        """SIGKILL before the actor exists: kill it as soon as it does."""
        self._thread.join(timeout=60)
        if self.actor is not None and not self._exited:
            self._kill_actor()

    def _on_readable(self) -> None:
        if self.read_now() == 0:
            sock = self._sock
            if sock is not None and not self._eof:
                self._loop.remove_reader(sock.fileno())
                self._eof = True
                if self._code_known:
                    self._finish()

    def read_now(self) -> int:
        if not self._lock.acquire(blocking=False):
            return -1
        try:
            if self._exited or self._sock is None or self._eof:
                return 0 if self._exited or self._eof else -1
            try:
                n = self._sock.recv_into(self._buf)
            except BlockingIOError:
                return -1
            except OSError:
                return 0
            if n:
                self._events.data_received(self._view[:n])
            return n
        finally:
            self._lock.release()

    def read_view(self) -> memoryview | int:
        return -1  # output reaches the host only through the loop's reader (data_received)

    def end_view(self) -> None:
        pass

    def hold_output(self) -> bool:
        return False  # the loop reads the socket; a direct call waits for it

    def release_output(self, park: bool = False) -> None:
        pass

    def watch_output(self) -> None:
        pass

    def read_wait(self, timeout: float) -> int:
        return self.read_now()

    def _exit_known(self, code: int | None) -> None:
        self._code, self._code_known = code, True
        if self._sock is None or self._eof:
            self._finish()
        else:
            self._loop.call_later(_EOF_GRACE, self._finish)

    def _finish(self) -> None:
        if self._exited:
            return
        with self._lock:
            sock = self._sock
            if sock is not None and not self._eof:
                while True:
                    try:
                        n = sock.recv_into(self._buf)
                    except OSError:
                        n = 0
                    if n <= 0:
                        break
                    self._events.data_received(self._view[:n])
            self._exited = True
            self._input_closed = True
            self._pending.clear()
        if sock is not None:
            if not self._eof:
                self._loop.remove_reader(sock.fileno())
            if self._writer_on:
                self._loop.remove_writer(sock.fileno())
                self._writer_on = False
            sock.close()
        if self._stderr is not None:
            self._stderr.finish()
        if self._err_sock is not None:
            self._err_sock.close()
        self._events.process_exited(self._code, None)


class RayBackend:
    name = "ray"

    def start(
        self, spec: WorkerSpec, events: TransportEvents, loop: asyncio.AbstractEventLoop
    ) -> RayTransport:
        if spec.isolation:
            # Limits and isolation are applied by the local backends on this machine; a Ray
            # actor's worker runs elsewhere: refuse rather than drop them silently.
            raise IsolationError(
                f"bridge {spec.bridge!r}: the ray backend does not apply OS limits or isolation "
                f"({', '.join(sorted(spec.isolation))}). Fix: use Ray's own num_cpus / "
                "resources / runtime_env for placement and remove those options, or run this "
                "bridge on the local backend"
            )
        return RayTransport(spec, events, loop)
