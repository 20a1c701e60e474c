"""podi_multicollect: reduce a whole night, on this machine or a Dask cluster.

    podi_multicollect INPUT... OUTDIR [-makecals] [-formatout=%OBSID.fits] [-scheduler=ADDRESS]
                      [-workers=N] [-redo] [-follow] [-idle=S] [-fromfile=LIST]
                      [podi_collectcells flags]

Every exposure becomes one task that runs ``podi_collectcells`` on file paths in a
process of its own (``-ncpus=1`` unless the flags say otherwise), so a crash, a kill
or a leak costs that frame only and the outputs are those of single runs. The tasks
form one Dask graph: with ``-makecals`` the night's BIAS, DARK and flat exposures
(by ``OBSTYPE``) become masters first (``podi_makecalibrations``: bias, then dark,
then one flat per filter), and each science frame waits for the masters it uses;
with ``-persistency`` each science frame waits for the one before it, whose
saturation catalog its masks need. A task that fails is run once more, then
recorded as failed with its error line; the others go on.

The manifest (:mod:`podi_manifest`) makes the command resumable: rerun, it does only
what is missing, failed or changed (inputs, options or code); ``-redo`` does all.
The night summary (``night_summary.csv`` and ``.fits``) is rewritten as each frame
finishes, and the night page (``night.qa.html``) at the end.

``-follow`` watches the INPUT folder instead and reduces each exposure, in the order
they complete, once every file is complete FITS and all OTAs are there
(:class:`ExposureWatcher`).
"""

import importlib
import logging
import os
import resource
import signal
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from podi_manifest import Manifest, fingerprint
from podi_mef import remove_stale_temporaries

logger = logging.getLogger("podi_multicollect")

USAGE = """Usage: podi_multicollect INPUT... OUTDIR [flags] [podi_collectcells flags]

Reduces every exposure of INPUT (exposure folders, OTA files, or night folders holding
exposure folders) into OUTDIR, on a Dask cluster (by default one on this machine), and
keeps a manifest (multicollect.sqlite) so that a rerun does only what is missing.

  -fromfile=LIST       also take the inputs listed in LIST (one per line, # comments)
  -formatout=TEMPLATE  output names in OUTDIR (default %OBSID.fits); tags as podi_collectcells
  -makecals            make master bias, dark and flats of the night's calibration
                       exposures first (into -cals=DIR, default OUTDIR/cals) and use them
  -scheduler=ADDRESS   run on an existing Dask cluster (e.g. tcp://host:8786)
  -workers=N           processes of the local cluster (default: one per core)
  -redo                reduce every frame again
  -follow              watch the INPUT folder and reduce each exposure once it is complete
  -idle=S              with -follow: stop when nothing is left to do and no file has changed
                       for S seconds (default: never)
  -poll=S              with -follow: seconds between looks at the folder (default 2)
  -settle=S            with -follow: an exposure with fewer OTA files than the focal plane
                       is complete when its files have not changed for S seconds (default 10)
  -help                print this text
Every other flag goes to podi_collectcells unchanged (see podi_collectcells -help)."""

#: Seconds an exposure's files must stay unchanged before -follow reduces it (unless all
#: OTAs of the focal plane are there).
SETTLE_SECONDS = 10.0
#: Calibration exposure types that -makecals turns into masters.
CALIBRATION_TYPES = {"BIAS": "bias", "ZERO": "bias", "DARK": "dark", "DFLAT": "flat", "TFLAT": "flat",
                     "FLAT": "flat", "SFLAT": "flat"}
#: podi_collectcells flags that podi_makecalibrations takes as well.
MAKECALS_FLAGS = ("-gain", "-nonlinearity", "-crosstalk")
#: Memory (bytes) a task declares (:meth:`Frame.memory`): a fixed part and one per
#: unbinned OTA it holds.
FRAME_MEMORY = (400 * 2**20, 100 * 2**20)


class MulticollectError(Exception):
    """A problem with the command line or the inputs; the message is one line."""


# --- Tasks (run on the Dask workers) -------------------------------------------------------

@dataclass
class TaskResult:
    """What a task reports: success, wall and CPU seconds (of both tries), tries, error
    line, and when it started (Unix time)."""

    ok: bool
    seconds: float
    cpu_seconds: float
    attempts: int
    error: str = ""
    started: float = 0.0


def _children_cpu():
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _error_line(returncode, stderr):
    """The one line that says why a command failed."""
    if returncode < 0:
        return f"killed by {signal.Signals(-returncode).name}"
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if ": error:" in line]
    return (errors or lines or [f"exit code {returncode}"])[-1].strip()


def run_forked(command):
    """Run ``main(arguments)`` of a podi module (``command``: module, then arguments) in a
    forked child of this process, as its own program would run; returns its exit status
    (negative: killed by that signal) and what it wrote to stderr.

    The module is imported once per worker process, so a frame does not pay the 1.2
    CPU-seconds of a new interpreter's imports; the child holds only the forking thread
    and ends with ``os._exit``, so nothing of the Dask worker runs in it.
    """
    module = importlib.import_module(command[0])
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            os.close(read_end)
            null = os.open(os.devnull, os.O_RDWR)
            os.dup2(null, 0)
            os.dup2(null, 1)
            os.dup2(write_end, 2)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            logging.root.handlers.clear()  # the program sets up its own logging
            status = module.main(list(command[1:]))
        except SystemExit as error:
            status = error.code if isinstance(error.code, int) else 1
        except BaseException:  # noqa: BLE001 - reported as the program's own traceback would be
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(status or 0)
    os.close(write_end)
    with os.fdopen(read_end, encoding="utf-8", errors="replace") as stream:
        stderr = stream.read()
    _, wait_status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(wait_status), stderr


def run_command(command, *after):
    """Run a podi command line in a process of its own (:func:`run_forked`); once more
    if it fails. Never raises, so that a failure does not cancel the tasks after it.

    Parameters
    ----------
    command : list of str
        The module (``podi_collectcells``...), then its arguments.
    after : TaskResult
        Results of the tasks this one waited for (unused: Dask passes them).
    """
    _kill_worker_hook(command)
    started, start, cpu = time.time(), time.monotonic(), _children_cpu()
    for attempt in (1, 2):
        returncode, stderr = run_forked(command)
        if returncode == 0:
            break
    return TaskResult(returncode == 0, time.monotonic() - start, _children_cpu() - cpu, attempt,
                      "" if returncode == 0 else _error_line(returncode, stderr), started)


def _kill_worker_hook(command):
    """Test hook: ``PODI_KILL_FRAME=<output file name>:<marker file>`` kills the Dask
    worker process that starts that frame, once (the marker file records that it did)."""
    target, _, marker = os.environ.get("PODI_KILL_FRAME", "").partition(":")
    if target and Path(command[2]).name == target and not os.path.exists(marker):
        Path(marker).touch()
        os.kill(os.getpid(), signal.SIGKILL)


# --- Inputs --------------------------------------------------------------------------------

@dataclass
class Frame:
    """One task of the night: a science frame to reduce or a master to make."""

    output: str  # relative to OUTDIR where inside it: the manifest key
    kind: str  # "object" (any frame podi_collectcells reduces), "bias", "dark" or "flat"
    inputs: list  # exposure folders
    files: list  # every raw file (for the fingerprint)
    command: list = field(default_factory=list)
    header: object = None
    binning: int = 1
    filter: str = ""
    mjd: float = 0.0
    needs: list = field(default_factory=list)  # outputs of the frames it waits for
    error: str = ""  # known before it runs: it fails without running

    def memory(self):
        """Bytes the task declares: a reduction holds its OTAs, a master one OTA of each
        input exposure at a time."""
        count = len(self.files) if self.kind == "object" else len(self.inputs)
        return FRAME_MEMORY[0] + FRAME_MEMORY[1] * max(count, 1) / self.binning ** 2


def _holds_ota_files(folder):
    return any(folder.glob("*.[0-9][0-9].fits*"))


def expand_inputs(paths, fromfile=None, leave_out=()):
    """Exposure folders (or OTA files) of the command-line inputs: a folder without OTA
    files of its own is a night, whose sub-folders with OTA files are taken, except
    those in ``leave_out`` (the output folder may be inside the night's)."""
    from podi_makecalibrations import read_inputs
    paths = list(map(Path, paths)) + (read_inputs([fromfile]) if fromfile else [])
    leave_out = {Path(p).resolve() for p in leave_out}
    expanded = []
    for path in paths:
        if not path.exists():
            raise MulticollectError(f"{path}: no such file or directory")
        if path.is_dir() and not _holds_ota_files(path):
            expanded += sorted(child for child in path.iterdir() if child.is_dir() and _holds_ota_files(child)
                               and child.resolve() not in leave_out)
        else:
            expanded.append(path)
    return expanded


def describe(path, outdir, formatout):
    """A :class:`Frame` for one exposure (its header read); unreadable: ``error`` set."""
    from podi_commandline import OptionError, expand_output_name
    from podi_rawdata import RawDataError, find_exposure, read_exposure_header
    try:
        exposure = find_exposure(path)
        first = exposure.ota_files[min(exposure.ota_files)]
        header, binning = read_exposure_header(first)
        output = expand_output_name(outdir / formatout, header)
    except (RawDataError, OptionError, OSError) as error:
        name = Path(path).name
        return Frame(f"{name}.fits", "object", [str(path)], [str(path)], error=" ".join(str(error).split()))
    return Frame(_key(output, outdir), "object", [str(exposure.directory)],
                 [str(f) for f in exposure.ota_files.values()], header=header, binning=binning,
                 filter=str(header.get("FILTER", "")).strip(), mjd=float(header.get("MJD-OBS", 0.0)))


def _key(path, outdir):
    path = Path(path).resolve()
    try:
        return str(path.relative_to(outdir.resolve()))
    except ValueError:
        return str(path)


class NightPlan:
    """Commands and dependencies of the night's frames, batch after batch (``-follow``
    plans each batch of new exposures as it completes).

    With ``makecals`` the calibration exposures of the first batch become master tasks
    (bias, then dark, then a flat per filter); later ones are reduced like any frame.
    A science frame waits for the masters of its binning (and filter) and, with
    ``-persistency``, for the science frame before it.
    """

    def __init__(self, outdir, flags, calsdir, makecals):
        self.outdir, self.flags, self.calsdir, self.makecals = outdir, flags, calsdir, makecals
        self.masters, self.seen, self.previous = [], {}, None
        self.chained = any(flag.split("=")[0] == "-persistency" for flag in flags)

    def add(self, frames):
        """Plan ``frames`` (:class:`Frame`, described); returns them in submission order."""
        science, groups = [], {}
        for frame in sorted(frames, key=lambda f: (f.mjd, f.output)):
            obstype = str(frame.header.get("OBSTYPE", "")).strip().upper() if frame.header is not None else ""
            kind = CALIBRATION_TYPES.get(obstype) if self.makecals and not frame.error else None
            if kind is None:
                science.append(frame)
            else:
                group = (kind, frame.binning, frame.filter if kind == "flat" else None)
                groups.setdefault(group, []).append(frame)
        self.makecals = False
        masters = [self._master(kind, binning, filter_name, members) for (kind, binning, filter_name), members
                   in sorted(groups.items(), key=lambda item: (("bias", "dark", "flat").index(item[0][0]),
                                                               str(item[0])))]
        for frame in science:
            if frame.output in self.seen and not frame.error:
                frame.error = f"the same output as {self.seen[frame.output]}"
            self.seen.setdefault(frame.output, frame.inputs[0])
            frame.command = ["podi_collectcells", frame.inputs[0], str(self.outdir / frame.output)] + self.flags
            frame.needs = [m.output for m in self.masters if m.binning == frame.binning
                           and (m.kind != "flat" or m.filter == frame.filter)]
            if self.chained and self.previous is not None:
                frame.needs.append(self.previous.output)
            if not frame.error:
                self.previous = frame
        return masters + science

    def _master(self, kind, binning, filter_name, members):
        from podi_calibfiles import master_name
        output = _key(self.calsdir / master_name(kind, binning, filter_name), self.outdir)
        inputs = [m.inputs[0] for m in members]
        earlier = {"bias": (), "dark": ("bias",), "flat": ("bias", "dark")}[kind]
        makecals_flags = [flag for flag in self.flags if flag.split("=")[0] in MAKECALS_FLAGS]
        master = Frame(output, kind, inputs, [f for m in members for f in m.files],
                       ["podi_makecalibrations"] + inputs + [str(self.calsdir), "-ncpus=1"] + makecals_flags,
                       binning=binning, filter=filter_name or "", mjd=min(m.mjd for m in members),
                       needs=[m.output for m in self.masters if m.binning == binning and m.kind in earlier])
        self.masters.append(master)
        return master


def collectcells_flags(flags, calsdir, makecals):
    """The flags every frame's podi_collectcells gets (checked once, here)."""
    from podi_commandline import OptionError, parse_commandline
    flags = list(flags)
    if not any(flag.split("=")[0] == "-ncpus" for flag in flags):
        # One frame per worker process: frames in parallel cost less than OTAs in parallel.
        flags.append("-ncpus=1")
    if makecals and not any(flag.startswith("-cals=") for flag in flags):
        flags.append(f"-cals={calsdir}")
    try:
        parse_commandline(["input", "output.fits"] + flags)
    except OptionError as error:
        raise MulticollectError(str(error)) from None
    return flags


# --- Follow mode -----------------------------------------------------------------------------

def fits_complete(path):
    """Whether a FITS file holds every byte its headers declare (a file still being
    written does not)."""
    from astropy.io import fits

    from podi_mef import open_fits
    try:
        # A file still being written is the normal case here, not one to warn about.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with open_fits(path) as hdulist:
                info = hdulist[-1].fileinfo()
                return info["datLoc"] + info["datSpan"] == os.path.getsize(path) and len(hdulist) > 1
    except (OSError, ValueError, IndexError, fits.VerifyError):
        return False


class ExposureWatcher:
    """Exposure folders of a night folder that are complete and not yet handed out.

    An exposure is complete when every OTA file is complete FITS (:func:`fits_complete`)
    and either all OTAs of the focal plane in use are there, or its files have not
    changed for ``settle`` seconds (the raw data carry no count of the OTAs to come).
    """

    def __init__(self, folder, settle=SETTLE_SECONDS, leave_out=()):
        self.folder, self.settle = Path(folder), settle
        self.leave_out = {Path(p).resolve() for p in leave_out}
        self.seen = {}  # exposure folder -> (snapshot of its files, when first seen so)
        self.handed = set()
        self.last_change = time.monotonic()  # of any exposure's files: writing is activity

    def complete(self):
        """Exposure folders that became complete since the last call, oldest first."""
        now, ready = time.monotonic(), []
        for folder in sorted(p for p in self.folder.iterdir()
                             if p.is_dir() and p not in self.handed and p.resolve() not in self.leave_out):
            files = sorted(folder.glob("*.[0-9][0-9].fits*"))
            snapshot = tuple((f.name, f.stat().st_size) for f in files)
            if self.seen.get(folder, (None,))[0] != snapshot:
                self.seen[folder] = (snapshot, now)
                self.last_change = now
            settled = now - self.seen[folder][1] >= self.settle
            if files and (settled or _whole_focal_plane(files)) and all(map(fits_complete, files)):
                self.handed.add(folder)
                ready.append(folder)
        return ready


def _whole_focal_plane(files):
    """Whether the OTA files are every working OTA of the focal plane of their date."""
    from podi_definitions import layout_for_mjd, working_otas
    from podi_rawdata import RawDataError, read_exposure_header
    try:
        mjd = read_exposure_header(files[0])[0]["MJD-OBS"]
    except (RawDataError, KeyError):
        return False
    otas = {int(f.name.split(".fits")[0][-2:]) for f in files}
    return otas >= set(working_otas(layout_for_mjd(mjd), mjd))


# --- Running on Dask ---------------------------------------------------------------------------

def start_client(scheduler, workers):
    """A Dask client: of ``scheduler``'s cluster, or of a new local one of ``workers``
    single-threaded processes, each declaring its share of the memory as ``MEMORY``."""
    import dask
    from dask.distributed import Client, LocalCluster
    # Frames run in processes of their own; a worker's memory is not its frames'.
    # Dask's nanny gives its workers MALLOC_TRIM_THRESHOLD_, which turns off glibc's
    # adaptive mmap threshold: a frame that frees and allocates OTA-sized arrays then
    # costs 20 % more CPU. The frames are forked from the workers and inherit it.
    environ = dask.config.get("distributed.nanny.pre-spawn-environ", {})
    dask.config.set({"distributed.nanny.pre-spawn-environ": {key: value for key, value in environ.items()
                                                             if key != "MALLOC_TRIM_THRESHOLD_"}})
    dask.config.set({"distributed.worker.memory.terminate": False,
                     "distributed.scheduler.allowed-failures": 1,
                     # A worker holds only the task it runs: the others stay queued.
                     "distributed.scheduler.worker-saturation": 1.0,
                     # Tasks last seconds: Dask's own bookkeeping at its default rates
                     # (a tick every 20 ms, system and memory samples every 0.1-0.5 s)
                     # took a tenth of a core from the frames.
                     "distributed.admin.tick.interval": "1s",
                     "distributed.admin.system-monitor.interval": "5s",
                     "distributed.worker.memory.monitor-interval": "2s"})
    if scheduler:
        try:
            return Client(scheduler, timeout=10)
        except OSError as error:
            raise MulticollectError(f"cannot reach the Dask scheduler at {scheduler} ({error})") from None
    workers = workers or os.cpu_count() or 1
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        import bokeh  # noqa: F401  (the dashboard needs it)
        dashboard = ":0"
    except ImportError:
        dashboard = None
    cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                           resources={"MEMORY": memory // workers}, dashboard_address=dashboard,
                           silence_logs=False)
    return Client(cluster)


def _worker_memory(client):
    """The smallest ``MEMORY`` resource among the workers; None unless all declare one."""
    workers = client.scheduler_info().get("workers", {}).values()
    memories = [worker.get("resources", {}).get("MEMORY") for worker in workers]
    return min(memories) if memories and None not in memories else None


class Progress:
    """Frames done, failed and running, frames per minute and the time left: a line
    rewritten in place on a terminal, else one log line per finished frame."""

    def __init__(self, total, stream=None):
        stream = sys.stderr if stream is None else stream
        self.total, self.stream, self.start = total, stream, time.monotonic()
        self.done = self.failed = self.running = 0
        self.live = stream.isatty()

    def line(self):
        minutes = (time.monotonic() - self.start) / 60
        finished = self.done + self.failed
        rate = finished / minutes if minutes > 0 else 0.0
        left = self.total - finished
        eta = f", ETA {left / rate:.1f} min" if rate > 0 and left > 0 else ""
        return (f"{finished}/{self.total} frames: {self.done} done, {self.failed} failed, {self.running} "
                f"running, {rate:.1f} frames/min{eta}")

    def show(self, event=None):
        """Redraw the line; a finished frame (``event``) is also kept above it."""
        if self.live:
            kept = f"{event}\n" if event else ""
            self.stream.write(f"\r\033[K{kept}{self.line()}")
            self.stream.flush()
        elif event:
            logger.info("%s (%s)", event, self.line())

    def close(self):
        if self.live:
            self.stream.write("\n")


def _record(manifest, frame, outdir, result):
    header = None
    if result.ok and frame.kind == "object":
        from astropy.io import fits
        try:
            header = fits.getheader(outdir / frame.output)
        except (OSError, ValueError):
            header = None
    manifest.finished(frame.output, result, header)
    manifest.write_summary()


class Night:
    """The Dask client, started when the first frame needs it (a rerun with nothing to
    do starts no cluster)."""

    def __init__(self, scheduler, workers):
        # memory: the smallest MEMORY resource of the workers (bytes), None if one has none.
        self.scheduler, self.workers, self.client, self.memory = scheduler, workers, None, None

    def __enter__(self):
        return self

    def connect(self):
        if self.client is None:
            self.client = start_client(self.scheduler, self.workers)
            info = self.client.scheduler_info()
            link = self.client.dashboard_link if info.get("services", {}).get("dashboard") else None
            logger.info("Dask: %d workers at %s%s", len(info["workers"]), self.client.scheduler.address,
                        f", dashboard {link}" if link else "")
            self.memory = _worker_memory(self.client)
        return self.client

    def __exit__(self, *_):
        if self.client is not None:
            cluster = self.client.cluster
            self.client.close()
            if cluster is not None:
                cluster.close()


def run_night(night, frames, outdir, manifest, redo, watcher=None, plan=None, idle=None, poll=2.0):
    """Submit every frame that is not done, record each outcome; with ``watcher``, keep
    looking for new exposures (``plan`` turns them into frames) until every frame is
    finished and no file changed for ``idle`` seconds. Returns (done, failed) counts."""
    from dask.distributed import wait
    pending, by_key, submitted = set(), {}, {}
    progress = Progress(0)

    def submit(batch):
        for frame in batch:
            digest = fingerprint(frame.files, frame.command[3:] if frame.kind == "object" else frame.command)
            if not redo and not frame.error and manifest.is_done(frame.output, digest):
                continue
            manifest.plan(frame.output, frame.kind, ", ".join(frame.inputs), digest, frame.header)
            progress.total += 1
            if frame.error:
                _record(manifest, frame, outdir, TaskResult(False, 0.0, 0.0, 0, frame.error))
                progress.failed += 1
                progress.show(f"{frame.output} failed: {frame.error}")
                continue
            client = night.connect()
            after = [submitted[need] for need in frame.needs if need in submitted]
            # Capped at the smallest worker's: a task no worker can take would wait forever.
            memory = None if night.memory is None else {"MEMORY": min(frame.memory(), night.memory)}
            future = client.submit(run_command, frame.command, *after, key=f"frame-{frame.output}",
                                   pure=False, priority=-len(submitted), resources=memory)
            submitted[frame.output] = future
            pending.add(future)
            by_key[future.key] = frame

    submit(frames)
    try:
        while pending or watcher is not None:
            if watcher is not None:
                new = watcher.complete()
                if new:
                    submit(plan(new))
                elif idle is not None and not pending and time.monotonic() - watcher.last_change > idle:
                    break
            if not pending:
                time.sleep(poll)
                continue
            try:
                finished, _ = wait(list(pending), timeout=poll, return_when="FIRST_COMPLETED")
            except TimeoutError:
                finished = []
            processing = {key for keys in night.client.processing().values() for key in keys}
            for key in processing:
                if key in by_key and manifest.row(by_key[key].output)["state"] == "pending":
                    manifest.running(by_key[key].output)
            progress.running = len(processing)
            for future in finished:
                frame = by_key[future.key]
                pending.discard(future)
                try:
                    result = future.result()
                except Exception as error:  # a worker lost twice (KilledWorker) or cancelled
                    result = TaskResult(False, 0.0, 0.0, 1, f"{type(error).__name__}: {error}")
                _record(manifest, frame, outdir, result)
                progress.done += result.ok
                progress.failed += not result.ok
                progress.show(f"{frame.output} {'done' if result.ok else 'failed: ' + result.error} "
                              f"in {result.seconds:.1f} s")
            progress.show()
    finally:
        progress.close()
    return progress.done, progress.failed


# --- Command line -----------------------------------------------------------------------------

OWN_FLAGS = ("-fromfile", "-formatout", "-makecals", "-scheduler", "-workers", "-redo", "-follow", "-idle",
             "-poll", "-settle")


def parse_arguments(argv):
    """(positional paths, own options, podi_collectcells flags)."""
    paths, options, flags = [], {}, []
    for arg in argv:
        name, has_value, value = arg.partition("=")
        if not arg.startswith("-"):
            paths.append(arg)
        elif name in OWN_FLAGS:
            options[name[1:]] = value if has_value else True
        else:
            flags.append(arg)
    if len(paths) < 2 and not (options.get("fromfile") and paths):
        raise MulticollectError("give the inputs and the output folder (podi_multicollect -help)")
    for name in ("workers", "idle", "poll", "settle"):
        if name in options:
            try:
                options[name] = (int if name == "workers" else float)(options[name])
                if options[name] <= 0:
                    raise ValueError
            except ValueError:
                raise MulticollectError(f"-{name}={options[name]}: not a positive number") from None
    return paths, options, flags


def multicollect(argv):
    """Run the command; returns the exit status (1 if any frame failed)."""
    paths, options, flags = parse_arguments(argv)
    *inputs, outdir = paths
    outdir = Path(outdir)
    calsdir = Path(next((f.split("=", 1)[1] for f in flags if f.startswith("-cals=")), outdir / "cals"))
    makecals = bool(options.get("makecals"))
    follow = bool(options.get("follow"))
    if follow and (len(inputs) != 1 or not Path(inputs[0]).is_dir()):
        raise MulticollectError("-follow watches one folder: give it as the only input")
    outdir.mkdir(parents=True, exist_ok=True)
    if makecals:
        calsdir.mkdir(parents=True, exist_ok=True)
    flags = collectcells_flags(flags, calsdir, makecals)
    formatout = options.get("formatout", "%OBSID.fits")
    manifest = Manifest(outdir)
    watcher = ExposureWatcher(inputs[0], options.get("settle", SETTLE_SECONDS), (outdir, calsdir)) \
        if follow else None
    frames, plan = [], NightPlan(outdir, flags, calsdir, makecals)
    if not follow:
        described = [describe(path, outdir, formatout)
                     for path in expand_inputs(inputs, options.get("fromfile"), (outdir, calsdir))]
        if not described:
            raise MulticollectError("no exposures among the inputs")
        frames = plan.add(described)

    def plan_new(folders):
        return plan.add([describe(folder, outdir, formatout) for folder in folders])

    with Night(options.get("scheduler"), options.get("workers")) as night:
        done, failed = run_night(night, frames, outdir, manifest, bool(options.get("redo")), watcher, plan_new,
                                 options.get("idle"), options.get("poll", 2.0))
    rows = manifest.rows()
    for row in rows:
        # A killed run's half-written frames (their processes gone by now), also of
        # frames this run did not need to do again.
        remove_stale_temporaries(outdir / row["output"])
    outputs = [outdir / row["output"] for row in rows
               if row["kind"] == "object" and row["state"] == "done" and (outdir / row["output"]).exists()]
    manifest.write_summary()
    manifest.close()
    if outputs:
        from podi_qapage import write_night_page
        page = write_night_page(outputs, outdir / "night.qa.html")
        logger.info("night page %s", page)
    logger.info("%d frames done, %d failed in this run; summary %s", done, failed,
                outdir / "night_summary.csv")
    return 1 if failed else 0


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or any(arg in ("-help", "--help", "-h") for arg in argv):
        print(USAGE)
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # Dask's own news (workers starting, connections closing) is not the night's; read
    # when distributed is imported, here and in the worker processes.
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
    # Ctrl-C or SIGTERM: the finally clauses close the cluster; the manifest is consistent.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        return multicollect(argv)
    except (MulticollectError, OSError) as error:
        print(f"podi_multicollect: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("podi_multicollect: interrupted; rerun the same command to finish", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
