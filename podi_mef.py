"""The pipeline's multi-extension FITS format, shared by reduced frames and masters.

A primary HDU without data, then one float32 image extension ``OTA<xy>.SCI`` per OTA
(header ``FPPOS``) in the inside-out order of the focal plane, then tables. Files are
written under a temporary name and renamed, so that a crash or a kill never leaves
a partial file behind.
"""

import contextlib
import errno
import io
import mmap
import os
import re
from pathlib import Path

import numpy as np
from astropy.io import fits

from podi_definitions import ota_from_fppos
from podi_workers import process_exists


class CalibrationError(Exception):
    """A calibration file that cannot be used; the message names file and problem."""


class OutputError(OSError):
    """An output file that cannot be written (disk full, folder removed, ...); the
    message names the file and the reason, and no part of the file is left."""

    def __init__(self, filename, error):
        reason = error.strerror or " ".join(str(error).split()) or type(error).__name__
        super().__init__(f"{filename}: cannot be written ({reason}); no output written")
        self.errno = error.errno


def temporary_name(filename):
    """The name a file is written under until it is complete: ``.<name>.<pid>.tmp``."""
    filename = Path(filename)
    return filename.with_name(f".{filename.name}.{os.getpid()}.tmp")


def remove_stale_temporaries(filename):
    """Remove the temporary files of ``filename`` left by runs that were killed (their
    process no longer exists); returns how many."""
    filename = Path(filename)
    removed = 0
    for path in filename.parent.glob(f".{filename.name}.*.tmp*"):
        pid = path.name[len(filename.name) + 2:].split(".")[0]
        if pid.isdigit() and not process_exists(int(pid)):
            path.unlink(missing_ok=True)
            removed += 1
    return removed


@contextlib.contextmanager
def replaced_atomically(filename):
    """Yield the temporary name to write ``filename`` under; rename it to ``filename``
    when the block ends, remove it if the block raises. Temporaries that killed runs
    left for ``filename`` are removed first. A reader never sees half a file."""
    filename = Path(filename)
    filename.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(filename)
    temporary = temporary_name(filename)
    try:
        yield temporary
        os.replace(temporary, filename)
    finally:
        temporary.unlink(missing_ok=True)


def write_atomic(hdulist, filename, overwrite=True):
    """Write an HDUList under a temporary name in the target folder, then rename.

    Parameters
    ----------
    hdulist : astropy.io.fits.HDUList
    filename : str or Path
    overwrite : bool
        If False, an existing file is an error (``FileExistsError``).
    """
    filename = Path(filename)
    if not overwrite and filename.exists():
        raise FileExistsError(f"{filename}: exists")
    with replaced_atomically(filename) as temporary:
        hdulist.writeto(temporary, overwrite=True, checksum=True)


class _Memory(io.BytesIO):
    """A byte buffer that survives astropy closing it after writing."""

    def close(self):
        pass


def hdu_bytes(hdu):
    """The bytes of one extension HDU as written in a file, with its checksums."""
    buffer = _Memory()
    fits.HDUList([fits.PrimaryHDU(), hdu]).writeto(buffer, checksum=True)
    raw = buffer.getvalue()
    with fits.open(io.BytesIO(raw)) as hdulist:
        start = hdulist[1].fileinfo()["hdrLoc"]
    return raw[start:]


_CHECKSUM_EXCLUDE = frozenset(range(0x3a, 0x41)) | frozenset(range(0x5b, 0x61))


def _ones_complement_sum(data, total=0):
    """32-bit ones'-complement sum of big-endian words (the FITS checksum arithmetic)."""
    total += int(np.frombuffer(data, dtype=">u4").astype(np.uint64).sum())
    while total >> 32:
        total = (total & 0xFFFFFFFF) + (total >> 32)
    return total


def _encode_checksum(value):
    """The 16 characters of a FITS ``CHECKSUM`` for a 32-bit value (Seaman et al. 2002)."""
    characters = [0] * 16
    for i in range(4):
        byte = (value >> (24 - 8 * i)) & 0xFF
        quotient, remainder = byte // 4 + ord("0"), byte % 4
        chars = [quotient + remainder, quotient, quotient, quotient]
        # Keep every character alphanumeric, pairwise so that the sum is unchanged.
        changed = True
        while changed:
            changed = False
            for j in (0, 2):
                while chars[j] in _CHECKSUM_EXCLUDE or chars[j + 1] in _CHECKSUM_EXCLUDE:
                    chars[j] += 1
                    chars[j + 1] -= 1
                    changed = True
        for j in range(4):
            characters[4 * j + i] = chars[j]
    return bytes(characters[15:] + characters[:15]).decode("ascii")


def header_number(value):
    """A measured number for a header card: 4 decimals, or -1.0 where it is undefined.

    FITS cards cannot hold NaN; -1 is the original pipeline's "not measured".
    """
    return round(float(value), 4) if np.isfinite(value) else -1.0


def add_keywords(target, keywords):
    """Add ``keywords`` (key -> card) to a header or keyword dictionary, each only once.

    Every keyword has one owner: a step that writes a keyword another step already
    wrote is a programming error, which this makes loud instead of letting the
    later one silently win.
    """
    for key, card in keywords.items():
        if key in target:
            raise ValueError(f"keyword {key} written twice")
        target[key] = card


def native_datasum(array):
    """FITS ``DATASUM`` of a native-order float32 (or 32-bit) array as it will be written.

    The big-endian words of the file, read as numbers, are the native words of the
    array before its bytes are swapped, so the sum needs neither the swap nor a
    converted copy.
    """
    words = np.ascontiguousarray(array).reshape(-1).view(np.uint32)
    total = int(words.sum(dtype=np.uint64))
    while total >> 32:
        total = (total & 0xFFFFFFFF) + (total >> 32)
    return total


def header_text_with_checksum(header):
    """Renew the ``CHECKSUM`` of an HDU header whose ``DATASUM`` is set; return its FITS text.

    The header is updated in place. The data are not read: their sum is the
    header's ``DATASUM``.
    """
    header["CHECKSUM"] = "0" * 16
    text = header.tostring().encode("ascii")
    total = _ones_complement_sum(text, int(header["DATASUM"]))
    header["CHECKSUM"] = _encode_checksum(~total & 0xFFFFFFFF)
    return header.tostring()


class StreamedMEF:
    """A MEF written while it is being made: image extensions as they come, then tables,
    then the primary header into space reserved for it at the start.

    The image data are already in files in FITS (big-endian) order and are copied
    file to file by the kernel (``sendfile``), never through Python. Everything is
    written under a temporary name: :meth:`finish` renames it, :meth:`abort`
    removes it, so a partial file never carries the final name.

    Parameters
    ----------
    filename : str or Path
    reserved_blocks : int
        2880-byte blocks kept for the primary header (36 cards each).
    """

    def __init__(self, filename, reserved_blocks=12):
        self.filename = Path(filename)
        remove_stale_temporaries(self.filename)
        self.tmp = temporary_name(self.filename)
        self.reserved = reserved_blocks * 2880
        self.header_sizes = {}
        with self._writing():
            self.out = open(self.tmp, "wb", buffering=0)
            self.out.write(bytes(self.reserved))

    @contextlib.contextmanager
    def _writing(self):
        """Turn an operating-system error of writing (disk full, folder removed) into
        an :class:`OutputError` naming the output."""
        try:
            yield
        except OutputError:
            raise
        except OSError as error:
            raise OutputError(self.filename, error) from None

    def _copy(self, target, source, offset, nbytes):
        """Copy nbytes of file ``source`` from ``offset`` to the end of ``target``, kernel to kernel."""
        copied = 0
        while copied < nbytes:
            sent = os.sendfile(target.fileno(), source.fileno(), offset + copied, nbytes - copied)
            if sent == 0:
                raise OSError(errno.EIO, f"{source.name} ended {nbytes - copied} bytes early")
            copied += sent

    def add_image(self, header_text, data_path, nbytes):
        """Append an image extension: header text (with checksums) and its data file.

        Returns
        -------
        int
            Offset of the extension's header in the file, for :meth:`patch_header`.
        """
        with self._writing():
            offset = self.out.tell()
            self.header_sizes[offset] = len(header_text)
            self.out.write(header_text.encode("ascii"))
            with open(data_path, "rb") as source:
                self._copy(self.out, source, 0, nbytes)
            self.out.write(bytes(-nbytes % 2880))
        return offset

    def patch_header(self, offset, header_text):
        """Rewrite an extension header already in the file with text of the same length."""
        if len(header_text) != self.header_sizes[offset]:
            raise ValueError(f"{self.filename}: a rewritten header must keep its "
                             f"{self.header_sizes[offset]} bytes, not {len(header_text)}")
        with self._writing():
            os.pwrite(self.out.fileno(), header_text.encode("ascii"), offset)

    def add_table(self, hdu):
        with self._writing():
            self.out.write(hdu_bytes(hdu))

    def finish(self, primary_header):
        """Write the data-less primary HDU at the start and give the file its name."""
        primary = _primary_bytes(primary_header, self.reserved)
        with self._writing():
            if len(primary) == self.reserved:
                os.pwrite(self.out.fileno(), primary, 0)
                self.out.close()
            else:
                # The header outgrew its space: copy the extensions behind a larger one.
                self.out.close()
                moved = self.tmp.with_name(self.tmp.name + ".2")
                try:
                    with open(self.tmp, "rb") as source, open(moved, "wb", buffering=0) as out:
                        out.write(primary)
                        self._copy(out, source, self.reserved, self.tmp.stat().st_size - self.reserved)
                    os.replace(moved, self.tmp)
                finally:
                    moved.unlink(missing_ok=True)
            os.replace(self.tmp, self.filename)

    def abort(self):
        self.out.close()
        self.tmp.unlink(missing_ok=True)


def _primary_bytes(header, size):
    """A data-less primary HDU with checksums, padded with blank cards to ``size`` bytes if it fits."""
    hdu = fits.PrimaryHDU(header=header)
    hdu.header.set("EXTEND", True, "there are extensions", after="NAXIS")
    cards = len(hdu.header.cards) + 3  # END, and CHECKSUM and DATASUM to come
    for _ in range(max(size // 80 - cards, 0)):
        hdu.header.add_blank()
    buffer = _Memory()
    fits.HDUList([hdu]).writeto(buffer, checksum=True)
    return buffer.getvalue()


#: More extensions than a file of this program holds (64 cells, or 30 OTAs and tables):
#: a garbled header can make astropy find the same extensions again and again.
MAX_HDUS = 100


def open_fits(filename, max_hdus=MAX_HDUS, **options):
    """Open a FITS file and read every header, refusing a corrupt structure.

    astropy follows the sizes a header declares: a flipped byte that makes one of
    them negative sends it back over the same extensions, forever and with growing
    memory. Here every ``NAXISn`` must be a non-negative integer and the file may
    hold at most ``max_hdus`` HDUs.

    Returns
    -------
    astropy.io.fits.HDUList
        Open, with ``options`` (e.g. ``memmap=True``) as ``fits.open`` takes them.

    Raises
    ------
    ValueError
        Naming the HDU and the keyword that make the file unreadable.
    """
    hdulist = fits.open(filename, lazy_load_hdus=True, **options)
    try:
        for index, hdu in enumerate(hdulist):
            if index >= max_hdus:
                raise ValueError(f"more than {max_hdus} extensions: a corrupt header")
            header = hdu.header
            for axis in range(1, int(header.get("NAXIS", 0)) + 1):
                value = header.get(f"NAXIS{axis}")
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    raise ValueError(f"HDU {index}: NAXIS{axis} = {value!r} is not a size")
    except Exception:
        hdulist.close()
        raise
    return hdulist


#: Calibration files a process keeps open: filename -> (mtime_ns, size, HDUList, index).
#: Insertion order is use order; past :data:`MAX_OPEN_CALIBRATIONS` the oldest is closed.
_OPEN_CALIBRATIONS = {}
MAX_OPEN_CALIBRATIONS = 8


def open_calibration(filename):
    """An open calibration file (memory-mapped) and its OTA -> extension index.

    Kept open for the life of the process: a worker reducing several OTAs parses
    the headers of each master once, and a master process that opens its
    calibrations before it forks its workers hands them over parsed. A file whose
    modification time or size changed (a master rewritten during the night) is
    opened anew and its old mapping closed, so no deleted master stays mapped.

    Returns
    -------
    (astropy.io.fits.HDUList, dict)
    """
    filename = str(filename)
    stat = os.stat(filename)
    entry = _OPEN_CALIBRATIONS.pop(filename, None)
    if entry is not None and entry[:2] != (stat.st_mtime_ns, stat.st_size):
        entry[2].close()
        entry = None
    if entry is None:
        hdulist = open_fits(filename, memmap=True)
        by_ota = {}
        for index in range(len(hdulist)):
            for ota in _ota_of(hdulist[index].header):
                by_ota.setdefault(ota, index)
        entry = (stat.st_mtime_ns, stat.st_size, hdulist, by_ota)
    _OPEN_CALIBRATIONS[filename] = entry
    while len(_OPEN_CALIBRATIONS) > MAX_OPEN_CALIBRATIONS:
        _OPEN_CALIBRATIONS.pop(next(iter(_OPEN_CALIBRATIONS)))[2].close()
    return entry[2], entry[3]


def release_calibration_pages():
    """Unmap the pages of the open calibration files that this process has read.

    A worker reads one OTA (64 MB unbinned) of each master per OTA it reduces;
    without this the pages of every OTA it reduced stay in its memory (they count
    in its proportional set size) until the process ends. The files stay open and
    their pages in the page cache: the next read maps them again without I/O.
    """
    for _, _, hdulist, _ in _OPEN_CALIBRATIONS.values():
        mapping = getattr(hdulist._file, "_mmap", None)  # astropy's one map of the file
        if mapping is not None and not mapping.closed:
            mapping.madvise(mmap.MADV_DONTNEED)


def _ota_of(header):
    """The OTA an extension header belongs to (by ``FPPOS``, else ``EXTNAME``), as a list."""
    if "FPPOS" in header:
        try:
            return [ota_from_fppos(header["FPPOS"])]
        except ValueError:
            return []
    name = str(header.get("EXTNAME", "")).strip().upper()
    match = re.fullmatch(r"OTA(\d\d)\.SCI", name)
    return [int(match.group(1))] if match else []


def read_ota_image(filename, ota, size, mapped=False):
    """Read the image of one OTA from a pipeline-format file (a master calibration).

    Parameters
    ----------
    filename : str or Path
    ota : int
    size : int
        Expected side of the OTA array (4096 at binning 1, 2048 at binning 2).
    mapped : bool
        Return the read-only memory map of the file's data (big-endian) instead of
        a native float32 copy. Arithmetic reads it in one pass without a converted
        copy (3-5 times faster than reading the file into an array and swapping its
        bytes), and a reader of a few parts of the image reads only their pages.

    Returns
    -------
    (numpy.ndarray, astropy.io.fits.Header, astropy.io.fits.Header)
        Image, the extension header and the primary header.

    Raises
    ------
    CalibrationError
        File unreadable, OTA missing or of the wrong size (binning).
    """
    try:
        hdulist, by_ota = open_calibration(filename)
        index = by_ota.get(ota)
        if index is None:
            raise CalibrationError(f"{filename}: has no extension for OTA {ota:02d}")
        hdu = hdulist[index]
        if hdu.data is None or hdu.data.shape != (size, size):
            shape = None if hdu.data is None else hdu.data.shape
            raise CalibrationError(f"{filename}: OTA {ota:02d} is {shape}, expected "
                                   f"({size}, {size}): binning does not match the raw data")
        data = hdu.data if mapped else np.array(hdu.data, dtype=np.float32)
        return data, hdu.header.copy(), hdulist[0].header.copy()
    except CalibrationError:
        raise
    except Exception as error:
        raise CalibrationError(f"{filename}: not a readable FITS file "
                               f"({' '.join(str(error).split())})") from None


def check_calibration_binning(filename, size):
    """Raise :class:`CalibrationError` unless some OTA image of a master is ``size`` square.

    Checked once per frame, before any OTA is reduced, so that a master of the
    wrong binning stops the frame with one clear message; one extension of another
    size fails only its OTA (:func:`read_ota_image`).
    """
    try:
        hdulist, _ = open_calibration(filename)
        shapes = {(hdu.header["NAXIS2"], hdu.header["NAXIS1"]) for hdu in hdulist
                  if hdu.is_image and hdu.header.get("NAXIS") == 2}
    except Exception as error:
        raise CalibrationError(f"{filename}: not a readable FITS file "
                               f"({' '.join(str(error).split())})") from None
    if not shapes:
        raise CalibrationError(f"{filename}: holds no OTA images")
    if (size, size) not in shapes:
        found = ", ".join(f"{s[1]}x{s[0]}" for s in sorted(shapes))
        raise CalibrationError(f"{filename}: OTA images are {found}, the raw data need "
                               f"{size}x{size}: binning does not match")


# --- Header cards ----------------------------------------------------------------------

def valid_cards(header, leave_out=()):
    """A copy of a header without the cards astropy cannot parse (a garbled byte) and
    without the keywords in ``leave_out``; returns it and the keywords dropped as
    unparsable."""
    kept, dropped = fits.Header(), []
    for card in header.cards:
        if card.keyword in leave_out:
            continue
        try:
            card.verify("exception")
        except Exception:  # noqa: BLE001 - astropy raises several types for a bad card
            dropped.append(card.keyword)
            continue
        kept.append(card)
    return kept, dropped


#: Longest string value of a header card, and room for value + comment on one card
#: (80 minus "KEYWORD = ", the quotes and " / ").
FITS_TEXT = 68
_CARD_ROOM = 65


def text_keyword(text, comment, keep_end=False):
    """(value, comment) of a string header card that fits on one 80-character card.

    The value keeps at most 68 characters: the start of a longer text, or its end
    with ``keep_end`` (the file name of a long path says more than its directories).
    The comment is dropped when it no longer fits beside the value.
    """
    text = str(text)
    if len(text) > FITS_TEXT:
        text = text[-FITS_TEXT:] if keep_end else text[:FITS_TEXT]
    # FITS pads string values to 8 characters and doubles embedded quotes.
    if max(len(text.replace("'", "''")), 8) + len(comment) > _CARD_ROOM:
        comment = ""
    return text, comment
