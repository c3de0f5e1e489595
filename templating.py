"""Message templates: Jinja2's sandbox, run in a small pool of separate processes with limits the OS enforces."""

from __future__ import annotations

import functools
import logging
import math
import os
import pickle
import resource
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection

logger = logging.getLogger(__name__)

TEMPLATE_MAX_CHARS = 50_000
TEMPLATE_MAX_RANGE = 1000
# The reply is UTF-8 text of at most TEMPLATE_MAX_CHARS characters (4 bytes each at most), plus a status byte.
_MAX_REPLY_BYTES = TEMPLATE_MAX_CHARS * 4 + 1
_MAX_ERROR_CHARS = 500


class TemplateFailed(Exception):
    """A message template could not be compiled or rendered."""


# --- inside a render process -------------------------------------------------------------------------------------

_TEMPLATE_ENV = None


def _environment():
    global _TEMPLATE_ENV
    if _TEMPLATE_ENV is None:
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        class _BoundedEnvironment(ImmutableSandboxedEnvironment):
            """Sandboxed (no Python internals, nothing mutable) and bounded, since templates are user input:
            no huge ranges, repetitions or powers. These are early, friendly refusals; the process limits hold
            whatever slips past them."""

            intercepted_binops = frozenset(["*", "**"])

            def call_binop(self, context, operator, left, right):
                if operator == "**" and isinstance(right, (int, float)) and abs(right) > 100:
                    raise TemplateFailed("exponent over 100")
                if operator == "*" and any(isinstance(v, (str, list, tuple)) for v in (left, right)):
                    sequence, count = (left, right) if isinstance(left, (str, list, tuple)) else (right, left)
                    # By the length it would make, not the count: 'x' * 50000 * 50000 is 2.5 GB.
                    if isinstance(count, int) and len(sequence) * count > TEMPLATE_MAX_CHARS:
                        raise TemplateFailed(f"repetition would make {len(sequence) * count:,} items, "
                                             f"over {TEMPLATE_MAX_CHARS:,}")
                return super().call_binop(context, operator, left, right)

        def bounded_range(*args):
            values = range(*args)
            if len(values) > TEMPLATE_MAX_RANGE:
                raise TemplateFailed(f"range over {TEMPLATE_MAX_RANGE} items")
            return values

        _TEMPLATE_ENV = _BoundedEnvironment(autoescape=False, trim_blocks=True, lstrip_blocks=True)
        _TEMPLATE_ENV.globals["range"] = bounded_range
    return _TEMPLATE_ENV


@functools.lru_cache(maxsize=128)
def _compiled(template: str):
    # A render process lives long and an alert's template rarely changes: compiling costs more than rendering.
    return _environment().from_string(template)


def render_here(template: str, context: dict) -> str:
    """Render in this process (only the render processes call this); TemplateFailed says what went wrong."""
    from jinja2 import TemplateError

    try:
        parts, size = [], 0
        for part in _compiled(template).generate(**context):
            parts.append(part)
            size += len(part)
            if size > TEMPLATE_MAX_CHARS:
                raise TemplateFailed(f"output over {TEMPLATE_MAX_CHARS:,} characters")
        return "".join(parts)
    except (TemplateFailed, MemoryError):
        raise
    except TemplateError as exc:
        raise TemplateFailed(f"{type(exc).__name__}: {exc}") from None
    except Exception as exc:  # templates can raise anything a filter raises (ZeroDivisionError, …)
        raise TemplateFailed(f"{type(exc).__name__}: {exc}") from None


def _serve(requests, replies, memory_bytes: int, cpu_seconds: int) -> None:
    """A render process: limit its own address space, then render one request at a time until the pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the service, which stops us
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    _environment()
    while True:
        try:
            template, context = pickle.loads(requests.recv_bytes())  # from the service: trusted
        except (EOFError, OSError):
            return
        # CPU time is cumulative, so each render gets its own allowance above what was used so far. A backstop:
        # the service kills a render that passes its wall-clock deadline first.
        usage = resource.getrusage(resource.RUSAGE_SELF)
        soft = math.ceil(usage.ru_utime + usage.ru_stime) + cpu_seconds
        resource.setrlimit(resource.RLIMIT_CPU, (soft, resource.getrlimit(resource.RLIMIT_CPU)[1]))
        try:
            reply = b"o" + render_here(template, context).encode("utf-8", "surrogatepass")
        except TemplateFailed as exc:
            reply = b"f" + str(exc)[:_MAX_ERROR_CHARS].encode("utf-8", "replace")
        except MemoryError:
            del template, context
            replies.send_bytes(b"m")
            return  # a process that ran out of memory is replaced, not trusted with the next render
        replies.send_bytes(reply)


# --- in the service ---------------------------------------------------------------------------------------------


@dataclass
class _Worker:
    process: subprocess.Popen
    requests: Connection
    replies: Connection


class RenderPool:
    """A few long-lived render processes. A render waits at most `timeout` for a free process and runs at most
    `timeout` (then its process is killed and replaced); the process may use `memory_mb` of address space."""

    def __init__(self, *, processes: int, timeout_seconds: float, memory_mb: int) -> None:
        self.processes = processes
        self.timeout = timeout_seconds
        self.memory_bytes = memory_mb * 1024 * 1024
        self._idle: list[_Worker] = []
        self._all: dict[int, _Worker] = {}  # by pid, idle or lent out
        self._starting = 0
        self._cond = threading.Condition()
        self._closed = False

    def warm(self) -> None:
        """Start every render process now, so that the first templated message does not wait for them."""
        started = time.perf_counter()
        with self._cond:
            missing = self.processes - len(self._all) - self._starting
            self._starting += missing
        try:
            workers = [self._spawn() for _ in range(missing)]
        finally:
            with self._cond:
                self._starting -= missing
        with self._cond:
            for worker in workers:
                if self._closed:
                    _kill(worker)
                else:
                    self._idle.append(worker)
            self._cond.notify_all()
        logger.info("%d template render process(es) started in %.0f ms", len(workers),
                    (time.perf_counter() - started) * 1000)

    def render(self, template: str, context: dict) -> str:
        """The template's output, or TemplateFailed saying which limit it hit."""
        try:
            request = pickle.dumps((template, context), protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:  # a value the template would see cannot be copied to the render process
            raise TemplateFailed(f"a value cannot be passed to the template: {type(exc).__name__}") from None
        worker = self._acquire()
        healthy = False
        try:
            worker.requests.send_bytes(request)
            if not worker.replies.poll(self.timeout):
                raise TemplateFailed(f"rendering took longer than TEMPLATE_TIMEOUT_SECONDS ({self.timeout:g}s)")
            try:
                reply = worker.replies.recv_bytes(_MAX_REPLY_BYTES)
            except OSError:
                if self._closed:
                    raise
                raise TemplateFailed(f"output over {TEMPLATE_MAX_CHARS:,} characters") from None
            status, payload = reply[:1], reply[1:]
            if status == b"m":
                raise TemplateFailed(f"rendering needed more than TEMPLATE_MEMORY_MB ({self.memory_bytes >> 20} MB)")
            healthy = True
            if status == b"f":
                raise TemplateFailed(payload.decode("utf-8", "replace"))
            return payload.decode("utf-8", "surrogatepass")
        except (EOFError, OSError):  # the process died, or close() killed it and closed its pipes
            if self._closed:
                raise TemplateFailed("the service is stopping") from None
            try:
                worker.process.wait(0.5)
            except subprocess.TimeoutExpired:
                pass
            if worker.process.returncode == -signal.SIGXCPU:
                raise TemplateFailed("rendering used more CPU time than TEMPLATE_TIMEOUT_SECONDS allows") from None
            raise TemplateFailed(f"the render process ended (exit code {worker.process.returncode}), probably "
                                 f"over TEMPLATE_MEMORY_MB ({self.memory_bytes >> 20} MB)") from None
        finally:
            self._release(worker, healthy)

    def close(self) -> None:
        """Kill every render process, busy ones too: a render in progress fails at once."""
        with self._cond:
            self._closed = True
            workers = list(self._all.values())
            self._idle.clear()
            self._cond.notify_all()
        for worker in workers:
            _kill(worker)

    def _acquire(self) -> _Worker:
        deadline = time.monotonic() + self.timeout
        with self._cond:
            while True:
                if self._closed:
                    raise TemplateFailed("the service is stopping")
                if self._idle:
                    return self._idle.pop()
                if len(self._all) + self._starting < self.processes:
                    self._starting += 1
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TemplateFailed(f"no template render process was free within {self.timeout:g}s")
                self._cond.wait(remaining)
        try:
            worker = self._spawn()
        finally:
            with self._cond:
                self._starting -= 1
        if self._closed:
            _kill(worker)
            raise TemplateFailed("the service is stopping")
        return worker

    def _release(self, worker: _Worker, healthy: bool) -> None:
        with self._cond:
            if healthy and not self._closed and worker.process.poll() is None:
                self._idle.append(worker)
            else:
                self._all.pop(worker.process.pid, None)
            self._cond.notify()
        if not healthy:
            _kill(worker)
            if not self._closed:  # the replacement starts now, not in the next render's time
                threading.Thread(target=_warm_quietly, args=(self,), name="template-pool-start", daemon=True).start()

    def _spawn(self) -> _Worker:
        """Start one render process: a fresh interpreter running this file, which imports only Jinja2 (nothing of
        the service: no threads, no connections, no settings)."""
        request_read, request_write = os.pipe()
        reply_read, reply_write = os.pipe()
        try:
            process = subprocess.Popen(
                [sys.executable, "-I", os.path.abspath(__file__), str(request_read), str(reply_write),
                 str(self.memory_bytes), str(math.ceil(self.timeout) + 1)],
                pass_fds=(request_read, reply_write), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                close_fds=True,
            )
        except BaseException:
            for fd in (request_read, request_write, reply_read, reply_write):
                os.close(fd)
            raise
        os.close(request_read)
        os.close(reply_write)
        worker = _Worker(process, Connection(request_write, readable=False), Connection(reply_read, writable=False))
        with self._cond:
            self._all[process.pid] = worker
        return worker


def _kill(worker: _Worker) -> None:
    if worker.process.poll() is None:
        worker.process.kill()
    try:
        worker.process.wait(2)
    except subprocess.TimeoutExpired:
        logger.warning("template render process %s did not exit after SIGKILL", worker.process.pid)
    worker.requests.close()
    worker.replies.close()


_pool: RenderPool | None = None
_pool_lock = threading.Lock()


def start(*, processes: int = 2, timeout_seconds: float = 2.0, memory_mb: int = 256) -> RenderPool:
    """Replace the render pool (stopping the old one) with one of these limits, and start its processes."""
    global _pool
    with _pool_lock:
        old, _pool = _pool, RenderPool(processes=processes, timeout_seconds=timeout_seconds, memory_mb=memory_mb)
        pool = _pool
    if old is not None:
        old.close()
    threading.Thread(target=_warm_quietly, args=(pool,), name="template-pool-start", daemon=True).start()
    return pool


def _warm_quietly(pool: RenderPool) -> None:
    try:
        pool.warm()
    except Exception:
        logger.exception("template render processes did not start; they are started at the first render")


def stop() -> None:
    """Kill the render processes (at service shutdown)."""
    global _pool
    with _pool_lock:
        pool, _pool = _pool, None
    if pool is not None:
        pool.close()


def render(template: str, context: dict) -> str:
    """Render a template in a render process (started with default limits if the service did not start any)."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = RenderPool(processes=2, timeout_seconds=2.0, memory_mb=256)
        pool = _pool
    return pool.render(template, context)


if __name__ == "__main__":
    # A render process, started by RenderPool._spawn: request and reply pipe fds, address space and CPU limits.
    _serve(Connection(int(sys.argv[1]), writable=False), Connection(int(sys.argv[2]), readable=False),
           int(sys.argv[3]), int(sys.argv[4]))
