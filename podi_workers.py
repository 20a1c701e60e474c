"""Jobs keyed by OTA, run in worker processes that share image buffers.

This module knows no astronomy. A *job* is a key (an int, e.g. the OTA number), a
module-level function and its small picklable arguments; the function is called as
``function(key, image, context, *args)`` where ``image`` is the key's float32 array in
shared memory (:class:`SharedBuffers`) and ``context`` the pool's fixed context (the
run's settings, handed to each worker once), and returns a small picklable result. Pixel arrays
never travel through pickles: the master and the workers see the same buffer.

:class:`WorkerPool` starts ``ncpus`` worker processes once (fork on Linux) and keeps
them for every :meth:`WorkerPool.run` of the frame, so a second round of jobs on the
same keys (a later phase) costs no new processes, and per-process caches (tables,
masks) stay warm. A worker that raises fails its job only; a worker that dies (killed,
crashed) fails its job and is replaced. A deadline kills every worker and raises
:class:`JobsTimedOut`. ``serial=True`` runs the jobs in the calling process (for
profiling); both paths report through the same bookkeeping (:class:`_Ledger`).

Test hooks: ``PODI_FAULT=<kind>:<key>`` (key printed with two digits, as ``33``) makes
the job of that key ``crash`` (its process exits), ``kill`` (SIGKILL), ``hang`` or
``raise``; ``PODI_KILL_AT=<name>`` kills the process that reaches
:func:`kill_point` of that name; so that failure handling is tested by injected
faults rather than by racing sleeps.
"""

import contextlib
import ctypes
import errno
import gc
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

logger = logging.getLogger("podi_collectcells")


class JobsTimedOut(Exception):
    """The deadline passed; every worker was killed. The message is one line."""


def process_exists(pid):
    """Whether a process with this id exists (on this machine)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class SharedBuffers:
    """One file-backed native float32 array per key in shared memory (``/dev/shm``).

    The folder is ``podi_<pid>_<random>`` in the first of :attr:`ROOTS` with room for
    every buffer: the files are sparse, and a worker writing into a page that a full
    tmpfs cannot give dies of SIGBUS, so the room is checked before they are made. A
    run that was killed cannot remove its buffers, so every new set first removes
    those of processes that no longer exist.

    Parameters
    ----------
    keys : iterable of int
    shape : tuple of int

    Raises
    ------
    OSError
        ``ENOSPC``, naming each folder and its free space, when none has room.
    """

    #: Prefix of the buffer folders; the owning process's id follows.
    PREFIX = "podi_"
    #: Folders tried in order: memory first, then the temporary folder on disk.
    ROOTS = ("/dev/shm", tempfile.gettempdir())

    def __init__(self, keys, shape):
        keys = list(keys)
        self.shape = tuple(shape)
        self.nbytes = int(np.prod(self.shape)) * 4
        root = self._root_with_room(self.nbytes * len(keys))
        self.directory = Path(tempfile.mkdtemp(prefix=f"{self.PREFIX}{os.getpid()}_", dir=root))
        self.paths = {}
        for key in keys:
            path = self.directory / f"{key:02d}.f32"
            with open(path, "wb") as handle:
                handle.truncate(self.nbytes)
            self.paths[key] = path

    def _root_with_room(self, needed):
        free = {}
        for root in self.ROOTS:
            if not os.path.isdir(root):
                continue
            self.remove_stale(root)
            status = os.statvfs(root)
            free[root] = status.f_bavail * status.f_frsize
            if free[root] >= needed:
                if root != self.ROOTS[0]:
                    logger.warning("%s has only %.0f MB free: the OTA buffers (%.0f MB) go to %s",
                                   self.ROOTS[0], free.get(self.ROOTS[0], 0) / 2**20, needed / 2**20,
                                   root)
                return root
        rooms = ", ".join(f"{root} has {space / 2**20:.0f} MB free" for root, space in free.items())
        raise OSError(errno.ENOSPC, f"no room for the OTA buffers ({needed / 2**20:.0f} MB needed; "
                                    f"{rooms})")

    def array(self, key):
        """The buffer of ``key`` as a writable native float32 array."""
        return np.memmap(self.paths[key], dtype=np.float32, mode="r+", shape=self.shape)

    def release(self, key):
        """Free the memory of one buffer (its data are no longer needed)."""
        self.paths[key].unlink(missing_ok=True)

    def remove(self):
        for path in self.paths.values():
            path.unlink(missing_ok=True)
        self.directory.rmdir()

    @classmethod
    def remove_stale(cls, root):
        """Remove the buffer folders in ``root`` of processes that no longer exist."""
        for folder in Path(root).glob(f"{cls.PREFIX}*_*"):
            pid = folder.name[len(cls.PREFIX):].split("_")[0]
            if pid.isdigit() and not process_exists(int(pid)):
                # Only buffer files: a folder that holds anything else is not ours.
                for path in folder.glob("*.f32"):
                    path.unlink(missing_ok=True)
                with contextlib.suppress(OSError):
                    folder.rmdir()


def _death(exitcode):
    """How a worker process ended, from its exit code, with the likely cause."""
    if exitcode is None or exitcode >= 0:
        return f"exit code {exitcode}"
    name = signal.Signals(-exitcode).name if -exitcode in signal.valid_signals() else str(-exitcode)
    cause = {signal.SIGKILL: ": out of memory, or killed by hand",
             signal.SIGBUS: ": the shared-memory folder filled up"}.get(-exitcode, "")
    return f"killed by {name}{cause}"


def _inject_fault(key):
    fault = os.environ.get("PODI_FAULT", "")
    kind, _, target = fault.partition(":")
    if not fault or target != f"{key:02d}":
        return
    if kind == "crash":
        os._exit(3)
    if kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if kind == "hang":
        while True:
            time.sleep(60)
    if kind == "raise":
        raise RuntimeError("injected fault")


@contextlib.contextmanager
def time_limit(seconds):
    """Raise :class:`JobsTimedOut` in this thread when ``seconds`` have passed (SIGALRM).

    The pool's deadline watches its workers; this covers what runs in the calling
    process: the serial path (``serial=True``) and the caller's own steps. Only the
    main thread receives signals: elsewhere, and for ``seconds`` None, it does nothing.
    """
    if not seconds or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum, frame):
        raise JobsTimedOut(f"{seconds:.0f} s passed")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.001))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def kill_point(name):
    """Test hook: ``PODI_KILL_AT=<name>`` kills this process (SIGKILL, as the kernel or a
    power cut would end it) when it reaches ``kill_point(name)``."""
    if os.environ.get("PODI_KILL_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


def _call(function, key, args, buffers, context):
    """Run one job; return ``(status, payload, seconds)`` with status ``ok`` or ``error``."""
    start = time.monotonic()
    try:
        _inject_fault(key)
        image = buffers.array(key)
        payload = function(key, image, context, *args)
        del image
        return "ok", payload, time.monotonic() - start
    except JobsTimedOut:
        raise  # the run's time is up (serial path): that stops every job
    except Exception as error:  # one job's failure must not stop the others
        message = " ".join(str(error).split()) or type(error).__name__
        return "error", f"{type(error).__name__}: {message}", time.monotonic() - start


def _keep_freed_memory():
    """Let this process reuse the memory of freed large arrays (glibc only).

    By default glibc gives large arrays their own mappings and returns them when
    freed, so each job pays their page faults anew. Served from the heap and kept,
    the next job's temporaries reuse them (a full frame: about 10,000 fewer page
    faults of 275,000; most of the rest are the fresh shared buffers).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 1 << 30)
    libc.mallopt(m_trim_threshold, 1 << 31)


class _RecordBuffer(logging.Handler):
    """Keeps a worker's log records, made picklable, to send them to the master with
    the job's outcome: the master logs them, so that its handlers see every record
    of the run (a list of the run's warnings, say) and lines never interleave."""

    def __init__(self):
        super().__init__()
        self.records = []

    def emit(self, record):
        record.msg, record.args = record.getMessage(), None
        record.exc_info = record.exc_text = None
        self.records.append(record)

    def take(self):
        records, self.records = self.records, []
        return records


#: How often (s) an idle worker checks that its master still exists.
MASTER_CHECK_SECONDS = 1.0


def _worker_loop(connection, buffers, context):
    """A worker process: run each job sent over ``connection``, send back its outcome
    and the log records the job made."""
    _keep_freed_memory()
    records = _RecordBuffer()
    logging.getLogger().handlers = [records]
    # The objects inherited from the master are never garbage: leaving them out of
    # every collection saves the scans and the copy-on-write of their pages.
    gc.freeze()
    master = os.getppid()
    while True:
        # A master killed outright closes no pipe that a forked sibling also holds:
        # a worker whose parent is gone stops by itself.
        while not connection.poll(MASTER_CHECK_SECONDS):
            if os.getppid() != master:
                return
        try:
            task = connection.recv()
        except EOFError:
            return
        if task is None:
            return
        function, key, args = task
        outcome = _call(function, key, args, buffers, context)
        connection.send((*outcome, records.take()))


class _Worker:
    """A worker process, its end of the pipe, and the key of the job it runs (or None)."""

    def __init__(self, processes, buffers, context):
        self.connection, child = processes.Pipe()
        self.process = processes.Process(target=_worker_loop, daemon=True,
                                         args=(child, buffers, context))
        self.process.start()
        child.close()
        self.key = None

    def stop(self):
        if self.process.is_alive():
            self.process.kill()
        self.process.join()
        self.connection.close()


class _Ledger:
    """Bookkeeping of one round of jobs, shared by the serial and parallel paths."""

    def __init__(self, keys, on_done, label, verb):
        self.waiting = set(keys)
        self.results, self.failures = {}, {}
        self.on_done, self.label, self.verb = on_done, label, verb
        self.total, self.started = len(self.waiting), time.monotonic()
        self.bar = sys.stderr.isatty() and logger.getEffectiveLevel() > logging.DEBUG

    def done(self, key, status, payload, seconds):
        if key not in self.waiting:
            return
        self.waiting.discard(key)
        if status == "ok":
            self.results[key] = payload
        else:
            self.failures[key] = payload
        self._report(key, status, payload, seconds)
        self.on_done(key, payload if status == "ok" else None)

    def _report(self, key, status, payload, seconds):
        count = self.total - len(self.waiting)
        elapsed = time.monotonic() - self.started
        if status != "ok":
            if self.bar:
                sys.stderr.write("\n")
            logger.error("%s %02d failed: %s", self.label, key, payload)
        elif self.bar:
            filled = int(30 * count / self.total)
            sys.stderr.write(f"\r[{'#' * filled}{' ' * (30 - filled)}] {count}/{self.total} "
                             f"{self.label}s {elapsed:.1f} s")
            sys.stderr.flush()
        else:
            logger.info("%s %02d %s in %.2f s (%d/%d, %.1f s)", self.label, key, self.verb, seconds,
                        count, self.total, elapsed)

    def close(self):
        if self.bar and self.total > len(self.waiting):
            sys.stderr.write("\n")


class WorkerPool:
    """Worker processes that run rounds of keyed jobs on shared buffers.

    Parameters
    ----------
    buffers : SharedBuffers
    ncpus : int
        Worker processes (at most one per key of the largest round is useful).
    context : object
        Passed to every job; inherited by the workers when they start.
    deadline : float, optional
        ``time.monotonic()`` limit for every round.
    serial : bool
        Run every job in this process instead (profiling, ``ncpus=1``).
    label : str
        Name of a key in log lines (``'OTA'``).
    """

    def __init__(self, buffers, ncpus, context=None, deadline=None, serial=False, label="OTA"):
        self.buffers, self.context, self.deadline, self.label = buffers, context, deadline, label
        self.ncpus = max(1, int(ncpus))
        self.serial = serial
        self.workers = []
        if not serial:
            self.processes = multiprocessing.get_context(
                "fork" if sys.platform.startswith("linux") else "spawn")

    def run(self, function, jobs, on_done=lambda key, result: None, verb="done"):
        """Run ``function(key, image, context, *args)`` for every ``key: args`` of ``jobs``.

        ``on_done(key, result)`` is called in this process as each job ends
        (``result`` None when it failed), in the order they end. ``verb`` says in
        the log what a job did (``'reduced'``).

        Returns
        -------
        (dict, dict)
            key -> result of the jobs that succeeded, key -> one-line error message
            of those that failed.

        Raises
        ------
        JobsTimedOut
            The deadline passed; every worker has been killed.
        """
        ledger = _Ledger(jobs, on_done, self.label, verb)
        try:
            if self.serial:
                for key, args in jobs.items():
                    ledger.done(key, *_call(function, key, args, self.buffers, self.context))
            else:
                self._run_parallel(function, jobs, ledger)
        finally:
            ledger.close()
        return ledger.results, ledger.failures

    def _run_parallel(self, function, jobs, ledger):
        pending = list(jobs.items())
        while len(self.workers) < min(self.ncpus, len(jobs)):
            self.workers.append(_Worker(self.processes, self.buffers, self.context))
        while ledger.waiting:
            for worker in self.workers:
                if worker.key is None and pending:
                    worker.key, args = pending.pop(0)
                    worker.connection.send((function, worker.key, args))
            busy = [worker for worker in self.workers if worker.key is not None]
            multiprocessing.connection.wait([w.connection for w in busy] + [w.process.sentinel for w in busy],
                                            timeout=0.2)
            for worker in busy:
                self._collect(worker, ledger)
            if self.deadline is not None and time.monotonic() > self.deadline:
                self.close()
                raise JobsTimedOut(f"{len(ledger.waiting)} {self.label}s unfinished")

    def _collect(self, worker, ledger):
        """Take a worker's outcome if it has one; a worker that died fails its job only."""
        message = None
        try:
            if worker.connection.poll():
                message = worker.connection.recv()
        except (EOFError, OSError):
            pass  # a broken pipe: the process died; see below
        if message is not None:
            # Outside the try: an error of the caller's on_done (writing the output,
            # say) is the caller's, not a dead worker.
            *outcome, records = message
            key, worker.key = worker.key, None
            for record in records:
                logging.getLogger(record.name).handle(record)
            ledger.done(key, *outcome)
            return
        if worker.process.is_alive():
            return
        key = worker.key
        worker.stop()
        self.workers.remove(worker)
        ledger.done(key, "error", f"worker process died ({_death(worker.process.exitcode)})", 0.0)
        self.workers.append(_Worker(self.processes, self.buffers, self.context))

    def close(self):
        """Stop every worker (a running job is killed)."""
        for worker in self.workers:
            worker.stop()
        self.workers.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
