"""Simulated raw ODI exposures with a known truth (command ``podi_simulate``).

The simulator writes exposures in the real on-disk format (one directory per
exposure, one 16-bit FITS file per OTA with 64 cell extensions) and, beside the
exposure directory, a truth record ``<exposure>.truth.fits`` and, for object
frames, the field's reference catalog ``<exposure>.refcat.fits``.

The forward model is the exact reverse of the reduction::

    electrons (sky + fringes + pupil ghost + stars) x flat + dark + cosmic rays  -> Poisson noise
    -> / cell gain -> inverse nonlinearity -> + bias level, bias structure, read noise
    -> clip at 65535 -> crosstalk (forward matrix) -> clip and round to 16 bits

The camera itself (gains, read noise, bias structure, flat field, dark current, hot
pixels, bad columns, nonlinearity) is fixed by an *instrument seed*, so that bias,
dark, flat and object exposures of one camera share their signatures as real ones
do; each exposure's noise, cosmic rays and bias drift come from its own seed.
Each effect can be switched off (see :class:`Effects`). A pixel holds at most
:data:`FULL_WELL` electrons: the excess of a bright star bleeds along its column within
the cell (the saturation trail); and the ADC clips raw values at 65535
(``SATURATION_ADU``), which every pixel of a trail reaches.

Persistence (``--persistence-from FILES``; automatic within a ``--count`` sequence): a
pixel that saturated in an earlier exposure releases trapped charge afterwards, at::

    A1 exp(-t / TAU1) + A2 exp(-t / TAU2)   electrons per second per unbinned pixel

``t`` seconds after the end of the saturating exposure (:data:`PERSISTENCE_A1` ...);
integrated over an exposure that runs from ``t0`` to ``t1`` it adds
``sum A tau (exp(-t0 / tau) - exp(-t1 / tau))`` electrons (:func:`persistence_electrons`)
to the electron image like dark current, in object, dark and flat frames. Every
truth record lists its saturated pixels (extension ``SATURATED``: ``ota``, ``x``,
``y``, pixels whose raw value reached 65535 before crosstalk) and when the exposure
ended (``MJDEND``); an exposure with persistence also holds the charge it received
(extension ``PERSIST``: ``ota``, ``x``, ``y``, ``electrons``) and the constants
(``PERSA1``, ``PERST1``, ``PERSA2``, ``PERST2``).

Fringes (``--fringes AMPLITUDE``) are light of the night-sky lines interfering in
the thin CCD: ``AMPLITUDE x sky electrons x P`` is added to the sky of object
frames, where ``P = Instrument.fringe_pattern(ota, binning)`` is the OTA's fixed
unit pattern (the true fringe template); the truth record holds ``FRNGAMP`` and
``FRNGSCL``, the fringe scale in reduced ADU per unit of P. A dithered sequence (``--count N --dither
ARCSEC``) offsets each exposure's true pointing at random from ``--ra/--dec``, which
stays the centre of one star field (see :func:`dithered`).

Moving target (``--moving dRA,dDec`` in arcsec/hour, ``dRA`` on the sky): a comet or
asteroid rendered as one more point source (same PSF, ``moving_mag`` in every band) in
object frames only, at its position at the exposure's start (:func:`moving_target`);
it is neither in the reference catalog nor in the truth's star table. The exposures
of a ``--count`` sequence are ``--interval`` seconds apart and share the target's
epoch, the first exposure's MJD-OBS. The truth record holds ``MOVRA``, ``MOVDEC``,
``MOVEPOCH``, ``MOVDRA``, ``MOVDDEC``, ``MOVOTA``, ``MOVX``, ``MOVY``.

Pupil ghost (``--pupilghost AMPLITUDE``, ``--pupilghost-profile FILE``, ``--rotator
DEG``): ODI's optics reflect a broad ring of light onto the central OTAs 33/34/43/44.
It is additive light: in object frames a fraction ``G`` of the sky, in dome flats
(``DFLAT``) the same fraction of the lamp; it passes through the flat field like the
sky does (:func:`true_pupilghost`). In focal-plane coordinates (unbinned pixels
relative to the optical axis, angles in degrees counter-clockwise from +x, as
:mod:`podi_pupilghost` defines them) the ghost at a point at distance ``r`` (unbinned
pixels) and angle ``theta`` from the ghost's centre is::

    G = AMPLITUDE x P(r) x (1 + PUPILGHOST_DIPOLE cos(theta - phi)),
    phi = PUPILGHOST_DIPOLE_ANGLE + ROTSTART

where ``P`` is the radial profile (fraction of the background; linear between the
tabulated radii, 0 outside them): :data:`PUPILGHOST_PROFILE` or the two-column file
(radius in 4x4-binned pixels, fraction) of ``--pupilghost-profile``. The ghost's
centre is :data:`PUPILGHOST_CENTRE` turned by ``ROTSTART`` about the optical axis plus
a random offset of up to :data:`PUPILGHOST_WOBBLE` pixels on each axis drawn from the
exposure's seed. WIYN is alt-az: the rotator keeps the sky, and so the WCS, fixed on
the detector while the telescope optics, and the ghost with them, turn by
``+ROTSTART``. Each binned pixel holds ``G`` at its centre. The truth record holds the
ghost's parameters (``PGAMP``, ``PGPEAK``, ``PGCNTR_X/Y``, ``PGRADIUS``, ``PGROTANG``,
``PGDIPOLE``, ``PGDIPANG``; for object frames ``PGSCALE``, the ghost in reduced ADU
per unit of the true template ``G``), and :func:`write_true_calibrations` writes the
true template (:func:`true_pupilghost_template`).

Pixel conventions: OTA arrays are numpy ``[y, x]``, 0-based, at the exposure's
binning; star positions in the truth record are 0-based pixels of that array.
"""

import argparse
import dataclasses
import logging
import math
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.table import Table, vstack
from astropy.time import Time
from astropy.wcs import WCS

import podi_crosstalk
import podi_nonlinearity
import podi_pupilghost
import podi_wcs
from podi_calibfiles import master_name, pupilghost_template_name
from podi_definitions import (N_CELLS, PIXEL_SCALE, SATURATION_ADU, all_cells, broken_cells, cell_extname,
                              cell_geometry, cell_origin, cell_to_ota, filter_level,
                              fppos_for_ota, layout_by_name, ota_origin_in_focal_plane,
                              otas_to_normalize_flat)
from podi_makecalibrations import (flat_normalisation_level, fringe_primary, master_extension,
                                   master_primary)
from podi_mef import write_atomic
from podi_stats import bin_image

logger = logging.getLogger(__name__)

#: Seed of the simulated camera: its defects are also what the package's ``bpm/``
#: region files describe.
INSTRUMENT_SEED = 2013

#: Mean gain of the simulated cells (e-/ADU).
NOMINAL_GAIN = 1.3

#: Electrons per second for a star of magnitude 0 is 10**(0.4 * ZP_E[filter]).
ZP_E = {"odi_u": 23.6, "odi_g": 26.3, "odi_r": 26.4, "odi_i": 25.9, "odi_z": 24.9}

#: Dark-sky rate in electrons per second per unbinned pixel.
SKY_RATE = {"odi_u": 0.3, "odi_g": 1.5, "odi_r": 3.0, "odi_i": 5.0, "odi_z": 6.0}

#: Reference-catalog band of each filter.
FILTER_BAND = {"odi_u": "u", "odi_g": "g", "odi_r": "r", "odi_i": "i", "odi_z": "z"}

_FILTER_IDS = {"odi_g": "w104", "odi_r": "w105", "odi_i": "w103", "odi_z": "w101",
               "odi_u": "c6022"}
_FILTER_ARM = {"odi_g": "FLTARM1A", "odi_r": "FLTARM1B", "odi_i": "FLTARM2A",
               "odi_z": "FLTARM2B", "odi_u": "FLTARM3A"}

#: Radius (degrees) of the simulated star field around the pointing: covers both
#: focal planes with room for pointing errors.
FIELD_RADIUS = 0.85

#: Built-in radial profile of the pupil ghost, an approximation of the measured odi_r
#: profile: (radius from the ghost's centre in unbinned pixels, ghost light as a
#: fraction of the background). Linear in between, 0 outside.
PUPILGHOST_PROFILE = ((1100, 0.0), (1180, 0.0007), (1260, 0.0043), (1300, 0.0166),
                      (1400, 0.0236), (1500, 0.0280), (1660, 0.0318), (1900, 0.0335),
                      (2100, 0.0320), (2300, 0.0281), (2500, 0.0247), (2700, 0.0218),
                      (2900, 0.0190), (3100, 0.0159), (3180, 0.0125), (3260, 0.0069),
                      (3340, 0.0030), (3460, 0.0009), (3620, 0.0))

#: Binning of the radii in pupil-ghost profile files (like the real
#: ``pupilghost__<FILTER>.profile``).
PROFILE_FILE_BINNING = 4

#: Focal-plane position (unbinned pixels) of the ghost's centre at rotator angle 0;
#: the rotator turns it about the optical axis.
PUPILGHOST_CENTRE = (30.0, -20.0)

#: Half-width (unbinned pixels) of the uniform random offset of the ghost's centre on
#: each axis, drawn per exposure: the optics do not come back to the same place
#: night after night.
PUPILGHOST_WOBBLE = 8.0

#: Relative amplitude of the ghost's dipole (one side brighter than the other).
PUPILGHOST_DIPOLE = 0.1

#: Direction of the dipole's bright side at rotator angle 0 (degrees from +x,
#: counter-clockwise); it turns with the rotator, so that a template must be turned too.
PUPILGHOST_DIPOLE_ANGLE = 40.0

#: Persistence, fast term: release rate (e-/s per unbinned pixel) of a saturated pixel
#: right after the end of the saturating exposure ...
PERSISTENCE_A1 = 2.0

#: ... and its decay time (s).
PERSISTENCE_TAU1 = 30.0

#: Persistence, slow term: release rate (e-/s per unbinned pixel) at the end of the
#: saturating exposure. 5 rather than 0.5: 300 s later a 300 s exposure then gets
#: ~80 e- per unbinned pixel, clearly above the sky noise of a 300 s r frame (~30 e-);
#: 900 s later only ~2 e-.
PERSISTENCE_A2 = 5.0

#: ... and its decay time (s): of the order of the ~100 s the original pipeline's
#: double-exponential fits found.
PERSISTENCE_TAU2 = 150.0

#: Slack (s) when comparing exposure times: MJDs in float64 are exact to ~1e-6 s, so
#: a sequence whose exposures follow without a pause may seem to overlap by that much.
TIME_TOLERANCE = 1e-3


@dataclass
class Effects:
    """Switches for every effect the pipeline removes (all on by default)."""

    bias: bool = True          # per-cell bias level + matching overscan + bias structure
    read_noise: bool = True
    gain: bool = True          # per-cell gain differences (off: every cell 1.3 e-/ADU)
    dark: bool = True          # dark current incl. hot pixels
    flat: bool = True          # flat-field pattern incl. bad columns
    sky: bool = True
    stars: bool = True
    poisson: bool = True
    crosstalk: bool = True
    nonlinearity: bool = True
    cosmics: bool = True
    distortion: bool = True    # radial optical distortion of the true WCS


@dataclass
class ExposureSpec:
    """What to simulate. Angles in degrees, times in seconds unless stated."""

    obstype: str = "OBJECT"
    layout: str = "podi"
    otas: tuple = None          # None: all OTAs of the layout
    binning: int = 1
    seed: int = 1
    field_seed: int = None      # star field; None: same as seed
    instrument_seed: int = INSTRUMENT_SEED
    exptime: float = 300.0
    filter: str = "odi_r"
    mjd: float = 56620.1
    ra: float = 150.0           # true pointing
    dec: float = 30.0
    field_centre: tuple = None  # (ra, dec) the stars are drawn around; None: the true pointing
    pointing_error: tuple = (0.0, 0.0)   # header minus true, arcsec (dRA cos(dec), dDec)
    rotator_error: float = 0.0  # true WCS rotated by this angle (degrees)
    # The true WCS departs from the canned model by what the reduction is not told:
    ota_offsets: float = 0.0    # rms (arcsec) of each OTA's own shift; its rotation moves its edge a fifth of that
    scale_error: float = 0.0    # fractional plate-scale change
    cubic_distortion: float = 0.0  # radial term k r^3 (deg, r in deg) added to the distortion
    star_density: float = 4000.0  # stars per square degree brighter than mag 22
    fwhm: float = 1.0           # arcsec
    moffat_beta: float = 3.5
    sky_rate: float = None      # e-/s/unbinned pixel; None: filter default
    fringe_amplitude: float = 0.0  # fringe light per unit of the pattern, in units of the sky
    rotator_angle: float = 0.0  # ROTSTART = ROTEND; turns the optics (pupil ghost), not the WCS
    pupilghost: float = 0.0     # pupil-ghost amplitude: multiplier of the radial profile; 0: none
    pupilghost_profile: str = None  # profile file (radius in 4x4-binned px, fraction); None: built-in
    flat_level: float = 30000.0  # DFLAT lamp level, ADU at the nominal gain
    airmass: float = 1.1
    object_name: str = "simulated field"
    sequence: int = 1
    crosstalk_file: str = None
    extra_stars: tuple = ()     # (ra, dec, mag) added to the field, same mag in every band
    moving: tuple = None        # moving target's (dRA cos(dec), dDec) in arcsec/hour; None: none
    moving_start: tuple = None  # its (ra, dec) at moving_epoch; None: field centre + (0.05, 0.05) deg
    moving_epoch: float = None  # MJD of moving_start; None: this exposure's mjd
    moving_mag: float = 17.0    # its magnitude in every band
    persistence_from: tuple = ()  # truth files of earlier exposures whose saturated pixels leave charge
    effects: Effects = dataclasses.field(default_factory=Effects)


# --- The camera ---------------------------------------------------------------------

class Instrument:
    """The simulated camera: everything fixed by the instrument seed.

    Every quantity is drawn from its own random stream keyed by (seed, OTA, name),
    so it does not depend on which other OTAs or quantities are simulated.
    """

    def __init__(self, layout, seed=INSTRUMENT_SEED, effects=None):
        self.layout = layout
        self.seed = seed
        self.effects = effects or Effects()
        self._arrays = {}

    def _rng(self, ota, name):
        return np.random.default_rng([self.seed, ota, sum(map(ord, name)) * 7919 + len(name)])

    def _cached(self, name, ota, binning, make):
        """``make(ota, binning)``, computed once per instrument (full OTA arrays are slow)."""
        key = (name, ota, binning)
        if key not in self._arrays:
            self._arrays[key] = make(ota, binning)
        return self._arrays[key]

    def gains(self, ota):
        """Cell gains (e-/ADU), array ``[cy, cx]``."""
        if not self.effects.gain:
            return np.full((N_CELLS, N_CELLS), NOMINAL_GAIN)
        return NOMINAL_GAIN * (1 + 0.06 * self._rng(ota, "gain").standard_normal((N_CELLS, N_CELLS)))

    def read_noise(self, ota):
        """Cell read noise (ADU), array ``[cy, cx]``."""
        return 6.5 + 0.4 * self._rng(ota, "rdnoise").standard_normal((N_CELLS, N_CELLS))

    def bias_level(self, ota):
        """Mean bias level of each cell (ADU) before the per-exposure drift."""
        return 1200 + 300 * self._rng(ota, "bias").random((N_CELLS, N_CELLS))

    def bias_structure(self, ota, binning, cell_shape):
        """Fixed bias pattern left after overscan subtraction (ADU), ``[cy, cx, row, col]``.

        Zero in the overscan block, so that the overscan matches the bias level.
        """
        rows, cols = cell_shape
        overscan_start = cell_geometry(binning).overscan_cols[0]
        slopes = self._rng(ota, "biasstructure").uniform(-4, 4, (N_CELLS, N_CELLS, 2))
        y = (np.arange(rows, dtype=np.float32) / rows - 0.5)[:, None]
        x = (np.arange(overscan_start, dtype=np.float32) / overscan_start - 0.5)[None, :]
        ripple = 0.8 * np.sin(2 * np.pi * np.arange(overscan_start) * binning / 37.0)
        out = np.zeros((N_CELLS, N_CELLS, rows, cols), np.float32)
        for cy, cx in np.ndindex(N_CELLS, N_CELLS):
            out[cy, cx, :, :overscan_start] = slopes[cy, cx, 0] * y + slopes[cy, cx, 1] * x + ripple
        return out

    def _defects(self, ota, name, count, length):
        """Positions of defects in unbinned OTA pixels: ``(x, y0, y1)`` per defect."""
        rng = self._rng(ota, name)
        x = rng.integers(20, 4016, count)
        y0 = rng.integers(0, 4000, count)
        return x, y0, np.minimum(y0 + rng.integers(1, length + 1, count), 4096)

    def hot_pixels(self, ota):
        """Hot pixels: unbinned ``(x, y)`` and dark current (e-/s)."""
        x, y, _ = self._defects(ota, "hot", 150, 1)
        rate = 10 ** self._rng(ota, "hotrate").uniform(0, 1.5, x.size)
        return x, y, rate

    def bad_columns(self, ota):
        """Bad columns: unbinned ``(x, y0, y1)`` (rows y0..y1-1) of low response."""
        return self._defects(ota, "badcol", 4, 1500)

    def dark_current(self, ota, binning):
        """Dark current (e-/s per pixel of the given binning) on the OTA array."""
        size = cell_geometry(binning).ota_size
        dark = np.full((size, size), 0.003 * binning**2, np.float32)
        x, y, rate = self.hot_pixels(ota)
        np.add.at(dark, (y // binning, x // binning), rate.astype(np.float32))
        return dark

    def flat(self, ota, binning):
        """Relative response (quantum efficiency x illumination) on the OTA array.

        A smooth vignetting over the focal plane, an OTA and a cell factor, 1 %
        pixel-to-pixel noise and bad columns at 40 % response.
        """
        return self._cached("flat", ota, binning, self._make_flat)

    def _make_flat(self, ota, binning):
        size = cell_geometry(binning).ota_size
        if not self.effects.flat:
            return np.ones((size, size), np.float32)
        rng = self._rng(ota, "flat")
        x0, y0 = ota_origin_in_focal_plane(ota, binning)
        coords = np.arange(size, dtype=np.float64)
        scale = 0.08 * (binning / 20000.0) ** 2
        # 1 - 0.08 (r / 20000 px)^2, built from two 1-d terms in one pass.
        flat = (1.0 - scale * (y0 + coords) ** 2).astype(np.float32)[:, None] - \
            (scale * (x0 + coords) ** 2).astype(np.float32)[None, :]
        flat *= np.float32(1 + 0.03 * rng.standard_normal())
        cell_factor = 1 + 0.02 * rng.standard_normal((N_CELLS, N_CELLS))
        for cx, cy in all_cells():
            flat[cell_to_ota(cx, cy, binning)] *= np.float32(cell_factor[cy, cx])
        noise = rng.standard_normal((size, size), dtype=np.float32)
        noise *= np.float32(0.01)
        noise += np.float32(1.0)
        flat *= noise
        for x, y0, y1 in zip(*self.bad_columns(ota)):
            flat[y0 // binning:(y1 + binning - 1) // binning, x // binning] *= np.float32(0.4)
        return flat

    def fringe_pattern(self, ota, binning):
        """Unit fringe pattern P of an OTA: the true fringe template.

        The OTA's thickness ``phi(x, y) = phi_x(x) + phi_y(y)`` (in waves of the
        strongest sky line; a tilt, a bow and a ripple along each axis) makes each of
        three sky lines add ``w cos(2 pi s phi + c)``: curved bright and dark bands
        with local periods of roughly 50-300 unbinned pixels; lines of slightly
        different wavelength (scale ``s``) beat into a varying amplitude. Unbinned
        pixels are evaluated at their centres, 0-based.

        Parameters
        ----------
        ota : int
        binning : {1, 2}

        Returns
        -------
        numpy.ndarray
            float32 OTA array ``[y, x]`` of the given binning. P has mean 0 and rms 1
            over the unbinned OTA, exactly; a binned pixel holds the mean of the
            unbinned pixels it covers, so every binning shows the same pattern (whose
            rms at binning 2 is a fraction of a percent below 1).
        """
        return self._cached("fringe", ota, binning, self._make_fringe_pattern)

    def _make_fringe_pattern(self, ota, binning):
        rng = self._rng(ota, "fringe")
        size = cell_geometry(1).ota_size
        period = rng.uniform(80.0, 160.0)
        direction = rng.uniform(0, 2 * np.pi)
        phase_x, phase_y = (_fringe_phase_profile(rng, size, wavenumber, period)
                            for wavenumber in (math.cos(direction) / period, math.sin(direction) / period))
        scale = np.concatenate([[1.0], 1 + rng.uniform(-0.12, 0.12, 2)])
        weight = np.concatenate([[1.0], rng.uniform(0.3, 0.7, 2)])
        along_x = 2 * np.pi * np.outer(phase_x, scale) + rng.uniform(0, 2 * np.pi, scale.size)
        along_y = 2 * np.pi * np.outer(phase_y, scale)
        # cos(a + b) = cos a cos b - sin a sin b: the pattern is y_factors @ x_factors.T,
        # whose mean, rms and block means follow exactly from the 1-d factors.
        x_factors = np.hstack([weight * np.cos(along_x), -weight * np.sin(along_x)])
        y_factors = np.hstack([np.cos(along_y), np.sin(along_y)])
        mean = y_factors.mean(axis=0) @ x_factors.mean(axis=0)
        mean_square = np.sum((y_factors.T @ y_factors) * (x_factors.T @ x_factors)) / size**2
        rms = math.sqrt(mean_square - mean**2)
        x_factors = np.column_stack([x_factors / rms, np.full(size, -mean / rms)])
        y_factors = np.column_stack([y_factors, np.ones(size)])
        x_factors, y_factors = (f.reshape(-1, binning, f.shape[1]).mean(axis=1).astype(np.float32)
                                for f in (x_factors, y_factors))
        return y_factors @ x_factors.T

    def nonlinearity(self, ota):
        """Correction coefficients ``[cy, cx, (c2, c3)]`` of the nonlinearity model."""
        rng = self._rng(ota, "nonlin")
        c2 = -7e-7 * (1 + 0.25 * rng.standard_normal((N_CELLS, N_CELLS)))
        return np.stack([c2, -c2 * 8.5e-6], axis=-1)

    def cellmode(self, ota):
        """``CELLMODE`` string: ``S`` everywhere but the broken cells (``D``)."""
        mode = ["S"] * (N_CELLS * N_CELLS)
        for cx, cy in broken_cells(self.layout, ota):
            mode[cx + N_CELLS * cy] = "D"
        return "".join(mode)

    def write_nonlinearity_table(self, directory, otas):
        """Write this camera's nonlinearity table and history into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        rows = [(ota, cx, cy, self.nonlinearity(ota)[cy, cx],
                 self.gains(ota)[cy, cx] / self.gains(ota).mean())
                for ota in otas for cx, cy in all_cells()]
        ota, cellx, celly, coeffs, relgain = (np.array(col) for col in zip(*rows))
        table = directory / "nonlinearity_simulated.fits"
        podi_nonlinearity.write_nonlinearity(table, ota, cellx, celly, coeffs, relgain, overwrite=True)
        (directory / "nonlinearity.history").write_text("# simulated camera\n0.0 nonlinearity_simulated.fits\n")
        return table


def _fringe_phase_profile(rng, size, wavenumber, period):
    """Thickness profile (waves) along one OTA axis at unbinned pixels ``0..size-1``.

    A tilt of ``wavenumber`` (waves per pixel), a bow and a ripple of 1200-3000 px;
    at the OTA edges the bow, and anywhere the ripple, change the local wavenumber by
    20-50 % and 15-30 % of ``1 / period``.
    """
    u = np.arange(size, dtype=np.float64)
    bow = rng.choice([-1, 1]) * rng.uniform(0.2, 0.5) / period * size / 4
    ripple_length = rng.uniform(1200.0, 3000.0)
    ripple = rng.uniform(0.15, 0.3) / period * ripple_length / (2 * np.pi)
    return (wavenumber * u + bow * (2 * u / size - 1) ** 2
            + ripple * np.sin(2 * np.pi * u / ripple_length + rng.uniform(0, 2 * np.pi)))


# --- The sky ------------------------------------------------------------------------

def moffat_alpha(fwhm, beta):
    """Moffat core radius alpha for a given FWHM (same units)."""
    return fwhm / (2 * math.sqrt(2 ** (1 / beta) - 1))


def moffat_enclosed(radius, fwhm, beta):
    """Fraction of a Moffat profile's flux inside ``radius`` (same units as fwhm)."""
    alpha = moffat_alpha(fwhm, beta)
    return 1 - (1 + (radius / alpha) ** 2) ** (1 - beta)


def star_field(spec):
    """The field's stars: true positions and magnitudes in every band.

    Returns
    -------
    astropy.table.Table
        ``ra``, ``dec`` (degrees), ``u g r i z`` true magnitudes.
    """
    rng = np.random.default_rng([spec.field_seed if spec.field_seed is not None else spec.seed, 7])
    m_bright, m_faint, slope = 13.0, 24.0, 0.3
    area = math.pi * FIELD_RADIUS**2
    n_total = spec.star_density * area * 10 ** (slope * (m_faint - 22.0))
    number = rng.poisson(n_total)
    # N(<m) grows as 10**(slope m) between the bright and faint limits.
    lo, hi = 10 ** (slope * m_bright), 10 ** (slope * m_faint)
    r_mag = np.log10(lo + rng.random(number) * (hi - lo)) / slope
    # Uniform on the sphere within FIELD_RADIUS of the pointing, built around the pole.
    cos_r = 1 - rng.random(number) * (1 - math.cos(math.radians(FIELD_RADIUS)))
    rho, phi = np.degrees(np.arccos(cos_r)), rng.uniform(0, 360, number)
    ra, dec = _offset_position(*(spec.field_centre or (spec.ra, spec.dec)), rho, phi)
    g_r = rng.uniform(0.2, 1.4, number)
    table = Table({"ra": ra, "dec": dec, "r": r_mag})
    table["g"] = r_mag + g_r
    table["u"] = table["g"] + 1.0 + 0.8 * g_r
    table["i"] = r_mag - 0.4 * g_r
    table["z"] = table["i"] - 0.2 * g_r
    for ra_extra, dec_extra, mag in spec.extra_stars:
        table.add_row({"ra": ra_extra, "dec": dec_extra, "u": mag, "g": mag, "r": mag, "i": mag, "z": mag})
    return table


def _offset_position(ra, dec, rho, phi):
    """Position at angular distance ``rho`` and position angle ``phi`` (degrees)."""
    d0, r0 = math.radians(dec), math.radians(ra)
    rho, phi = np.radians(rho), np.radians(phi)
    sin_d = math.sin(d0) * np.cos(rho) + math.cos(d0) * np.sin(rho) * np.cos(phi)
    dec_out = np.arcsin(np.clip(sin_d, -1, 1))
    dra = np.arctan2(np.sin(phi) * np.sin(rho) * math.cos(d0), np.cos(rho) - math.sin(d0) * sin_d)
    return np.degrees(r0 + dra) % 360, np.degrees(dec_out)


def moving_target(spec):
    """Position of the moving target (comet, asteroid) at the exposure's start.

    The target moves on a straight line in ``(ra, dec)`` at a constant rate from
    ``moving_start`` at MJD ``moving_epoch``. With ``dt_h = (MJD-OBS - epoch) * 24``::

        dec = dec0 + dDec dt_h / 3600
        ra  = ra0 + dRA dt_h / 3600 / cos(dec0)

    ``dRA`` is the rate on the sky, so the RA coordinate changes by ``dRA / cos(dec0)``
    at the start's declination (exact for the short arcs of a night's sequence).

    Parameters
    ----------
    spec : ExposureSpec
        ``moving`` (arcsec/hour), ``moving_start`` (degrees; default: the field centre
        offset by 0.05 degrees on the sky in RA and Dec, on OTA 44 of the model WCS),
        ``moving_epoch`` (MJD; default ``spec.mjd``); ``spec.mjd`` is MJD-OBS.

    Returns
    -------
    tuple or None
        ``(ra, dec)`` in degrees, or None without a moving target.
    """
    if spec.moving is None:
        return None
    if spec.moving_start is not None:
        ra0, dec0 = spec.moving_start
    else:
        ra0, dec0 = offset_pointing(*(spec.field_centre or (spec.ra, spec.dec)), (180.0, 180.0))
    epoch = spec.moving_epoch if spec.moving_epoch is not None else spec.mjd
    dra, ddec = spec.moving
    dt_h = (spec.mjd - epoch) * 24
    return (ra0 + dra * dt_h / 3600 / math.cos(math.radians(dec0))) % 360, dec0 + ddec * dt_h / 3600


def moving_target_pixel(spec, otas):
    """Where the moving target falls: OTA and 0-based pixel at the exposure's binning.

    Parameters
    ----------
    spec : ExposureSpec
    otas : sequence of int
        OTAs to look on, each with its true WCS (:func:`true_ota_wcs`).

    Returns
    -------
    tuple
        ``(ota, x, y)``; ``(-1, -1.0, -1.0)`` if it falls in a gap between them (FITS
        headers cannot hold NaN).
    """
    ra, dec = moving_target(spec)
    size = cell_geometry(spec.binning).ota_size
    for ota in otas:
        x, y = WCS(true_ota_wcs(spec, ota)).all_world2pix([ra], [dec], 0, quiet=True)
        # Pixel centres are integers: the array spans -0.5 .. size - 0.5.
        if -0.5 <= x[0] < size - 0.5 and -0.5 <= y[0] < size - 0.5:
            return ota, float(x[0]), float(y[0])
    return -1, -1.0, -1.0


def reference_catalog(stars, rng, limit=22.0):
    """Reference catalog of the field: noisy magnitudes with errors, ``r < limit``."""
    bright = stars[stars["r"] < limit]
    out = Table({"ra": bright["ra"], "dec": bright["dec"]})
    for band in "ugriz":
        error = 0.005 + 0.02 * 10 ** (0.4 * (bright[band] - 21.0))
        out[band] = bright[band] + error * rng.standard_normal(len(bright))
        out[f"{band}_err"] = error
    return out


# --- The pupil ghost ----------------------------------------------------------------

@dataclass(frozen=True)
class PupilGhost:
    """The pupil ghost of one exposure (see the module docstring).

    Attributes
    ----------
    amplitude : float
        Multiplier of the radial profile (0: no ghost).
    radii : numpy.ndarray
        Radii of the tabulated profile (unbinned pixels from the ghost's centre),
        increasing.
    profile : numpy.ndarray
        Radial profile ``P`` at ``radii``: fraction of the background.
    rotator : float
        Rotator angle ``ROTSTART`` (degrees).
    nominal_centre : (float, float)
        :data:`PUPILGHOST_CENTRE` turned by the rotator angle (focal plane, unbinned pixels).
    centre : (float, float)
        The exposure's true centre: the nominal one plus the random offset.
    """

    amplitude: float
    radii: np.ndarray
    profile: np.ndarray
    rotator: float
    nominal_centre: tuple
    centre: tuple

    @property
    def dipole_angle(self):
        """Direction ``phi`` of the dipole's bright side (degrees, in [0, 360))."""
        return (PUPILGHOST_DIPOLE_ANGLE + self.rotator) % 360

    @property
    def peak(self):
        """Peak of the radial profile times the amplitude (fraction, dipole excluded)."""
        return self.amplitude * float(self.profile.max())

    @property
    def inner_radius(self):
        """Inner edge: first radius where ``P`` reaches half its maximum (unbinned pixels)."""
        half = self.profile.max() / 2
        i = int(np.argmax(self.profile >= half))
        if i == 0:
            return float(self.radii[0])
        r0, r1, p0, p1 = self.radii[i - 1], self.radii[i], self.profile[i - 1], self.profile[i]
        return float(r0 + (half - p0) / (p1 - p0) * (r1 - r0))

    @property
    def outer_radius(self):
        """The ghost is 0 beyond this distance from its centre (unbinned pixels)."""
        return float(self.radii[-1])

    def fraction(self, dx, dy):
        """Ghost light ``G`` as a fraction of the background.

        Parameters
        ----------
        dx, dy : array_like
            Focal-plane offsets from the ghost's centre (unbinned pixels).

        Returns
        -------
        numpy.ndarray
            float64 ``G``, the amplitude and the dipole included.
        """
        dx, dy = np.asarray(dx, float), np.asarray(dy, float)
        r = np.hypot(dx, dy)
        radial = np.interp(r, self.radii, self.profile, left=0.0, right=0.0)
        phi = math.radians(self.dipole_angle)
        # cos(theta - phi) = (dx cos phi + dy sin phi) / r; P is 0 at r = 0 anyway.
        cosine = np.divide(dx * math.cos(phi) + dy * math.sin(phi), r, out=np.zeros_like(r), where=r > 0)
        return self.amplitude * radial * (1 + PUPILGHOST_DIPOLE * cosine)


def read_pupilghost_profile(path):
    """Radial pupil-ghost profile from a two-column text file.

    Parameters
    ----------
    path : str or Path
        Lines ``radius fraction`` with the radius in 4x4-binned pixels
        (:data:`PROFILE_FILE_BINNING`), increasing; blank lines and ``#`` comments
        are skipped.

    Returns
    -------
    (numpy.ndarray, numpy.ndarray)
        Radii in unbinned pixels and the fractions of the background.

    Raises
    ------
    OSError
        The file cannot be read.
    ValueError
        The file is not such a profile (the message names it).
    """
    try:
        text = Path(path).read_text()
    except OSError as error:
        raise OSError(f"cannot read pupil-ghost profile {path}: {error.strerror or error}") from None
    except UnicodeDecodeError:
        raise ValueError(f"pupil-ghost profile {path} is not a text file") from None
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        words = line.split("#")[0].split()
        if not words:
            continue
        try:
            radius, fraction = (float(word) for word in words)
        except ValueError:
            raise ValueError(f"pupil-ghost profile {path}, line {number}: expected 'radius fraction', "
                             f"got {line.strip()!r}") from None
        rows.append((radius * PROFILE_FILE_BINNING, fraction))
    table = np.array(rows, dtype=float).reshape(-1, 2)
    if len(table) < 2 or not np.all(np.isfinite(table)) or np.any(np.diff(table[:, 0]) <= 0) \
            or table[0, 0] < 0:
        raise ValueError(f"pupil-ghost profile {path}: needs at least two rows of finite values "
                         "with radii >= 0 increasing")
    if table[-1, 0] > podi_pupilghost.GHOST_OUTER_RADIUS:
        # Templates end there: light beyond could never be removed.
        raise ValueError(f"pupil-ghost profile {path} reaches {table[-1, 0]:g} unbinned px, beyond "
                         f"the {podi_pupilghost.GHOST_OUTER_RADIUS:g} px of a template")
    return table[:, 0], table[:, 1]


def pupil_ghost(spec):
    """The pupil ghost of an exposure: profile, amplitude, rotator angle and centre.

    Parameters
    ----------
    spec : ExposureSpec
        ``pupilghost``, ``pupilghost_profile``, ``rotator_angle``; ``seed`` draws
        the offset of the centre.

    Returns
    -------
    PupilGhost

    Raises
    ------
    OSError, ValueError
        ``spec.pupilghost_profile`` cannot be read or is no profile.
    """
    if spec.pupilghost_profile is None:
        radii, profile = (np.array(column, dtype=float) for column in zip(*PUPILGHOST_PROFILE))
    else:
        radii, profile = read_pupilghost_profile(spec.pupilghost_profile)
    angle = math.radians(spec.rotator_angle)
    x, y = PUPILGHOST_CENTRE
    nominal = (x * math.cos(angle) - y * math.sin(angle), x * math.sin(angle) + y * math.cos(angle))
    offset = np.random.default_rng([spec.seed, 17]).uniform(-PUPILGHOST_WOBBLE, PUPILGHOST_WOBBLE, 2)
    return PupilGhost(spec.pupilghost, radii, profile, spec.rotator_angle, nominal,
                      (nominal[0] + float(offset[0]), nominal[1] + float(offset[1])))


def _ghost_background(spec):
    """Electrons per pixel of the light the ghost is a fraction of: sky or lamp (0: none)."""
    if spec.obstype == "OBJECT":
        return sky_electrons(spec)
    if spec.obstype == "DFLAT":
        return spec.flat_level * NOMINAL_GAIN
    return 0.0


def true_pupilghost(spec, ota):
    """Electrons of the pupil ghost on one OTA before the flat field.

    A reduced frame holds the ghost in ADU as this times the master flat's level
    ``FLATNRMA``, just as :func:`true_signal`.

    Parameters
    ----------
    spec : ExposureSpec
    ota : int

    Returns
    -------
    numpy.ndarray
        float32 OTA array ``[y, x]`` at ``spec.binning``: ``G`` at each pixel's centre
        times the sky (object frames) or lamp (dome flats) in electrons per pixel;
        zeros without a ghost or where it does not fall.
    """
    binning = spec.binning
    size = cell_geometry(binning).ota_size
    image = np.zeros((size, size), np.float32)
    background = _ghost_background(spec)
    if spec.pupilghost <= 0 or background == 0:
        return image
    ghost = pupil_ghost(spec)
    # Only the pixels within the ghost's outer radius of its centre can hold light.
    (cx, cy), reach = ghost.centre, ghost.outer_radius
    (x_lo, x_hi), (y_lo, y_hi) = podi_pupilghost.focal_plane_to_pixel(
        ota, binning, np.array([cx - reach, cx + reach]), np.array([cy - reach, cy + reach]))
    x0, x1 = max(0, math.floor(x_lo)), min(size, math.ceil(x_hi) + 1)
    y0, y1 = max(0, math.floor(y_lo)), min(size, math.ceil(y_hi) + 1)
    if x0 >= x1 or y0 >= y1:
        return image
    x, y = podi_pupilghost.pixel_to_focal_plane(ota, binning, np.arange(x0, x1), np.arange(y0, y1))
    # In bands of rows: float64 temporaries of the whole box take ~0.5 GB unbinned.
    band = 256
    for start in range(0, y1 - y0, band):
        dy = (y[start:start + band] - cy)[:, None]
        image[y0 + start:y0 + start + dy.shape[0], x0:x1] = ghost.fraction((x - cx)[None, :], dy) * background
    return image


def true_pupilghost_template(spec):
    """The true pupil-ghost template of an exposure's optics.

    The ghost fraction ``G`` (amplitude ``spec.pupilghost``, dipole at
    ``spec.rotator_angle``) on a square grid of :data:`podi_pupilghost.TEMPLATE_STEP`
    unbinned pixels whose middle pixel is the ghost's centre, out to
    :data:`podi_pupilghost.GHOST_OUTER_RADIUS`.

    Returns
    -------
    podi_pupilghost.GhostTemplate
        Centred on the nominal centre of ``spec.rotator_angle`` (the random offset
        of one exposure is no part of the optics), with the profile's inner edge.
    """
    ghost = pupil_ghost(spec)
    step = podi_pupilghost.TEMPLATE_STEP
    half = math.ceil(podi_pupilghost.GHOST_OUTER_RADIUS / step)
    offsets = step * np.arange(-half, half + 1, dtype=float)
    image = ghost.fraction(offsets[None, :], offsets[:, None]).astype(np.float32)
    return podi_pupilghost.GhostTemplate(image, step=step, centre=ghost.nominal_centre,
                                         rotator=spec.rotator_angle, radius=ghost.inner_radius)


# --- One OTA ----------------------------------------------------------------------

def render_stars(image, x, y, flux, fwhm_px, beta):
    """Add Moffat stars (total electrons ``flux``) at 0-based pixel positions in place."""
    alpha = moffat_alpha(fwhm_px, beta)
    norm = (beta - 1) / (math.pi * alpha**2)
    ny, nx = image.shape
    for xs, ys, f in zip(x, y, flux):
        # Stamp radius where the flux lost beyond it drops under ~1 electron.
        radius = int(min(300, max(4 * fwhm_px, alpha * f ** (1 / (2 * beta - 2)))))
        x0, x1 = max(int(xs) - radius, 0), min(int(xs) + radius + 1, nx)
        y0, y1 = max(int(ys) - radius, 0), min(int(ys) + radius + 1, ny)
        if x0 >= x1 or y0 >= y1:
            continue
        dx2 = (np.arange(x0, x1) - xs) ** 2
        dy2 = (np.arange(y0, y1) - ys) ** 2
        stamp = (1 + (dy2[:, None] + dx2[None, :]) / alpha**2) ** (-beta)
        image[y0:y1, x0:x1] += (f * norm * stamp).astype(np.float32)


def _sky_signal(spec, instrument, ota, wcs, stars, ghost=True):
    """Electrons of light (before the flat) and the star truth of one OTA.

    Sky, its fringes, the stars and the moving target (:func:`moving_target`) of
    object frames, the lamp of dome flats, and the pupil ghost of either unless
    ``ghost`` is False. The moving target is not in ``stars`` nor in the star truth: it
    belongs to no star catalog.
    """
    size = cell_geometry(spec.binning).ota_size
    image = np.zeros((size, size), np.float32)
    truth = Table(names=("index", "x", "y", "flux"), dtype=(int, float, float, float))
    if ghost and spec.pupilghost > 0:
        # Reflected sky or lamp light (none in other frames).
        image += true_pupilghost(spec, ota)
    if spec.obstype == "DFLAT":
        # The lamp lights every OTA alike: flat_level ADU at the nominal gain.
        image += np.float32(spec.flat_level * NOMINAL_GAIN)
        return image, truth
    if spec.obstype != "OBJECT":
        return image, truth
    if spec.effects.sky:
        sky = sky_electrons(spec)
        image += np.float32(sky)
        if spec.fringe_amplitude:
            # Fringes are sky light too: they scale with it and pass through the flat.
            image += instrument.fringe_pattern(ota, spec.binning) * np.float32(spec.fringe_amplitude * sky)
    if not spec.effects.stars:
        return image, truth
    fwhm_px = spec.fwhm / podi_wcs.local_pixel_scale(wcs, size / 2, size / 2)
    margin = 60
    if len(stars):
        x, y = wcs.all_world2pix(stars["ra"], stars["dec"], 0, quiet=True)
        on = (x > -margin) & (x < size + margin) & (y > -margin) & (y < size + margin)
        flux = _star_electrons(spec, stars[FILTER_BAND[spec.filter]][on])
        render_stars(image, x[on], y[on], flux, fwhm_px, spec.moffat_beta)
        truth = Table({"index": np.flatnonzero(on), "x": x[on], "y": y[on], "flux": flux})
    target = moving_target(spec)
    if target is not None:
        x, y = wcs.all_world2pix([target[0]], [target[1]], 0, quiet=True)
        if -margin < x[0] < size + margin and -margin < y[0] < size + margin:
            render_stars(image, x, y, [_star_electrons(spec, spec.moving_mag)], fwhm_px, spec.moffat_beta)
    return image, truth


def _star_electrons(spec, mag):
    """Total electrons of a point source of magnitude ``mag`` in the exposure."""
    return 10 ** (-0.4 * (np.asarray(mag) - ZP_E[spec.filter])) * spec.exptime


def true_signal(spec, ota):
    """Electrons from sky, fringes and stars of one OTA before the flat field (the truth image).

    Without the pupil ghost (:func:`true_pupilghost`): a reduced frame in ADU equals
    this (plus the ghost) times the master flat's level ``FLATNRMA``.
    """
    layout = layout_by_name(spec.layout)
    wcs = WCS(true_ota_wcs(spec, ota))
    image, _ = _sky_signal(spec, Instrument(layout, spec.instrument_seed, spec.effects), ota, wcs,
                           star_field(spec), ghost=False)
    return image


def _sky_rate(spec):
    return spec.sky_rate if spec.sky_rate is not None else SKY_RATE[spec.filter]


def sky_electrons(spec):
    """Sky of an object exposure in electrons per pixel of its binning (0 without sky)."""
    return _sky_rate(spec) * spec.binning**2 * spec.exptime if spec.effects.sky else 0.0


def _cosmic_rays(image, exptime, rng):
    """Add cosmic-ray hits (short tracks of 1-6 pixels) in place."""
    size = image.shape[0]
    count = rng.poisson(1.0 * exptime)  # ~1 hit per second per OTA
    for _ in range(count):
        x, y = rng.integers(0, size, 2)
        length = rng.integers(1, 7)
        angle = rng.uniform(0, np.pi)
        xs = np.clip((x + np.arange(length) * np.cos(angle)).astype(int), 0, size - 1)
        ys = np.clip((y + np.arange(length) * np.sin(angle)).astype(int), 0, size - 1)
        image[ys, xs] += np.float32(rng.uniform(300, 5000))


def exposure_length(spec):
    """Time (s) the exposure collects charge: 0 for a bias."""
    return 0.0 if spec.obstype == "BIAS" else float(spec.exptime)


def persistence_electrons(t0, t1):
    """Charge a saturated unbinned pixel releases between ``t0`` and ``t1``.

    Parameters
    ----------
    t0, t1 : float
        Seconds after the end of the saturating exposure, ``0 <= t0 <= t1``.

    Returns
    -------
    float
        Electrons: ``sum A tau (exp(-t0 / tau) - exp(-t1 / tau))`` over the fast and the
        slow term (:data:`PERSISTENCE_A1`, :data:`PERSISTENCE_TAU1`, ...).
    """
    return sum(rate * tau * (math.exp(-t0 / tau) - math.exp(-t1 / tau))
               for rate, tau in ((PERSISTENCE_A1, PERSISTENCE_TAU1),
                                 (PERSISTENCE_A2, PERSISTENCE_TAU2)))


def _saturation_record(path):
    """Binning, end (MJD) and saturated pixels (``ota``, ``x``, ``y``) of a truth file."""
    with fits.open(path) as hdus:
        header = hdus[0].header
        if "SATURATED" not in hdus or "MJDEND" not in header:
            raise ValueError(f"persistence from {path}: not a truth record with a SATURATED "
                             f"table and MJDEND")
        return header["BINNING"], header["MJDEND"], Table(hdus["SATURATED"].data)


def persistence_charge(spec, ota=None):
    """Charge the saturated pixels of ``spec.persistence_from`` release in this exposure.

    Each earlier exposure's saturated pixels release :func:`persistence_electrons` over
    this exposure's ``[start, end]`` counted from that exposure's ``MJDEND``, times
    ``binning**2`` (the rates are per unbinned pixel).

    Parameters
    ----------
    spec : ExposureSpec
    ota : int, optional
        Only this OTA's pixels; default all.

    Returns
    -------
    astropy.table.Table
        ``ota``, ``x``, ``y`` (0-based pixels of the exposure's binning) and
        ``electrons``, one row per pixel: where several earlier exposures saturated the
        same pixel their charges add up. All zero for a bias.

    Raises
    ------
    ValueError
        If a truth file has another binning than this exposure, lacks the saturation
        record, or ends after this exposure starts.
    """
    otas, xs, ys, charges = [np.zeros(0, int)] * 3 + [np.zeros(0)]
    for path in spec.persistence_from:
        binning, end_mjd, saturated = _saturation_record(path)
        if binning != spec.binning:
            raise ValueError(f"persistence from {path}: its binning {binning} differs from this "
                             f"exposure's {spec.binning}; saturated pixels cannot be mapped")
        start = (spec.mjd - end_mjd) * 86400
        if start < -TIME_TOLERANCE:
            raise ValueError(f"persistence from {path}: it ends {-start:.3f} s after this exposure "
                             f"starts (MJD {spec.mjd}); persistence needs an earlier exposure")
        start = max(start, 0.0)
        if ota is not None:
            saturated = saturated[saturated["ota"] == ota]
        charge = spec.binning**2 * persistence_electrons(start, start + exposure_length(spec))
        otas, xs, ys = (np.concatenate([old, np.asarray(saturated[name], int)])
                        for old, name in ((otas, "ota"), (xs, "x"), (ys, "y")))
        charges = np.concatenate([charges, np.full(len(saturated), charge)])
    pixels, inverse = np.unique(np.column_stack([otas, ys, xs]), axis=0, return_inverse=True)
    electrons = np.bincount(inverse.ravel(), weights=charges, minlength=len(pixels))
    return Table({"ota": pixels[:, 0], "x": pixels[:, 2], "y": pixels[:, 1], "electrons": electrons})


#: Steps building the electron image of an OTA, in order; each takes
#: ``(image, spec, instrument, ota, rng)`` and changes ``image`` in place.
def _apply_flat(image, spec, instrument, ota, rng):
    if spec.obstype in ("OBJECT", "DFLAT"):  # only light sees the flat field
        image *= instrument.flat(ota, spec.binning)


def _add_dark(image, spec, instrument, ota, rng):
    if spec.effects.dark and spec.obstype != "BIAS":
        image += instrument.dark_current(ota, spec.binning) * np.float32(spec.exptime)


def _add_persistence(image, spec, instrument, ota, rng):
    # Released charge is no light: it bypasses the flat field, like dark current.
    if spec.persistence_from and spec.obstype != "BIAS":
        charge = persistence_charge(spec, ota)
        image[charge["y"], charge["x"]] += charge["electrons"].astype(np.float32)


#: Electrons a pixel holds (unbinned); the excess spills along the column within the
#: cell. Above the charge that reaches 65535 ADU at the simulated gains, so that every
#: pixel of a bleeding trail is saturated in the raw data as well.
FULL_WELL = 100000.0


def _bleed(image, spec, instrument, ota, rng):
    """Spill the charge above the full well along each column, within each cell.

    The excess of a column's over-full pixels fills the pixels next to them, upwards
    and downwards in turn, up to the full well each, until it is used up (what does not
    fit into the cell's column is lost): the saturation trail.
    """
    full = np.float32(FULL_WELL * spec.binning**2)
    if not (image > full).any():
        return
    for cx, cy in all_cells():
        rows, columns = cell_to_ota(cx, cy, spec.binning)
        cell = image[rows, columns]
        for column in np.flatnonzero((cell > full).any(axis=0)):
            values = cell[:, column]
            over = np.flatnonzero(values > full)
            excess = float(np.sum(values[over] - full))
            values[over] = full
            low, high = over.min() - 1, over.max() + 1
            while excess > 0 and (low >= 0 or high < values.size):
                for index in (high, low):
                    if 0 <= index < values.size and excess > 0:
                        room = max(0.0, float(full - values[index]))
                        values[index] += np.float32(min(room, excess))
                        excess -= room
                low, high = low - 1, high + 1


def _add_cosmics(image, spec, instrument, ota, rng):
    if spec.effects.cosmics and spec.obstype != "BIAS":
        _cosmic_rays(image, spec.exptime, rng)


SIGNAL_STEPS = [_apply_flat, _add_dark, _add_persistence, _add_cosmics, _bleed]


#: Above this many electrons a pixel's Poisson noise is drawn from the Gaussian
#: with the same mean and variance (skewness below 0.05), four times faster.
GAUSSIAN_LIMIT = 400.0


def photon_noise(expected, rng):
    """Photon counts (float32) for expected electrons ``expected`` (new array)."""
    expected = np.maximum(expected, 0)
    faint = expected < GAUSSIAN_LIMIT
    if faint.all():
        return rng.poisson(expected).astype(np.float32)
    counts = rng.standard_normal(expected.shape, dtype=np.float32)
    counts *= np.sqrt(expected)
    counts += expected
    if faint.any():
        counts[faint] = rng.poisson(expected[faint])
    return counts


def simulate_ota(spec, ota, stars, wcs_header, path, primary_cards):
    """Simulate and write one OTA file; return its truth tables.

    Returns
    -------
    dict
        ``stars`` (index into the field, x, y, flux in electrons), ``cells``
        (gain, read noise, bias level of each cell for this exposure) and
        ``saturated`` (ota, x, y of the saturated OTA pixels).
    """
    layout = layout_by_name(spec.layout)
    instrument = Instrument(layout, spec.instrument_seed, spec.effects)
    rng = np.random.default_rng([spec.seed, ota, 11])
    geometry = cell_geometry(spec.binning)
    wcs = WCS(wcs_header)
    electrons, star_truth = _sky_signal(spec, instrument, ota, wcs, stars)
    for step in SIGNAL_STEPS:
        step(electrons, spec, instrument, ota, rng)

    gains, read_noise = instrument.gains(ota), instrument.read_noise(ota)
    level = instrument.bias_level(ota) + rng.normal(0, 15, (N_CELLS, N_CELLS))
    cells = np.zeros((N_CELLS, N_CELLS) + geometry.raw_shape, np.float32)
    coefficients = instrument.nonlinearity(ota)
    # A bias has no electrons: nothing to add to its cells.
    for cx, cy in all_cells() if spec.obstype != "BIAS" else ():
        signal = electrons[cell_to_ota(cx, cy, spec.binning)]
        if spec.effects.poisson:
            signal = photon_noise(signal, rng)
        signal /= np.float32(gains[cy, cx])
        if spec.effects.nonlinearity:
            podi_nonlinearity.apply_inverse_nonlinearity(signal, coefficients[cy, cx])
        cells[cy, cx, :geometry.science_rows, :geometry.science_cols] = signal
    if spec.effects.bias:
        cells += level[:, :, None, None].astype(np.float32)
        cells += instrument.bias_structure(ota, spec.binning, geometry.raw_shape)
    if spec.effects.read_noise:
        cells += rng.standard_normal(cells.shape, dtype=np.float32) * \
            read_noise[:, :, None, None].astype(np.float32)
    np.clip(cells, 0, SATURATION_ADU, out=cells)
    # The ADC's last code: what rounds to 65535 before crosstalk mixes the cells.
    saturated = cells[:, :, :geometry.science_rows, :geometry.science_cols] >= SATURATION_ADU - 0.5
    if spec.effects.crosstalk:
        cells = mix_crosstalk(cells, _crosstalk_forward(spec))
    np.rint(cells, out=cells)
    np.clip(cells, 0, SATURATION_ADU, out=cells)
    raw = cells.astype(np.uint16)
    _write_ota_file(path, spec, instrument, ota, raw, gains, primary_cards)

    cell_truth = Table({"ota": np.full(64, ota), "cx": [c[0] for c in all_cells()],
                        "cy": [c[1] for c in all_cells()]})
    cell_truth["gain"] = [gains[cy, cx] for cx, cy in all_cells()]
    cell_truth["rdnoise"] = [read_noise[cy, cx] for cx, cy in all_cells()]
    cell_truth["bias_level"] = [level[cy, cx] if spec.effects.bias else 0.0 for cx, cy in all_cells()]
    star_truth["ota"] = np.full(len(star_truth), ota)
    flat_inputs = binned_flat(instrument, ota, spec.binning) if spec.obstype == "OBJECT" else None
    return {"stars": star_truth, "cells": cell_truth, "binned_flat": flat_inputs,
            "saturated": _saturated_pixels(saturated, ota, spec.binning)}


def _saturated_pixels(saturated, ota, binning):
    """Table ``ota``, ``x``, ``y`` (OTA pixels) of a ``[cy, cx, row, col]`` science mask."""
    xs, ys = [], []
    for cx, cy in all_cells():
        rows, cols = np.nonzero(saturated[cy, cx])
        x1, y1 = cell_origin(cx, cy, binning)
        xs.append(x1 + cols)
        ys.append(y1 + rows)
    x, y = np.concatenate(xs), np.concatenate(ys)
    return Table({"ota": np.full(x.size, ota), "x": x, "y": y})


def mix_crosstalk(cells, forward):
    """The readout's crosstalk: every target cell of a cell row receives each source
    cell of that row times ``forward[row, source, target]``.

    Written out here with einsum, not with :func:`podi_crosstalk.apply_crosstalk` that
    the pipeline unmixes with: a wrong axis there cannot then pass the tests.

    Parameters
    ----------
    cells : numpy.ndarray
        ``[cy, cx, rows, cols]`` float32 raw cells (ADU): cell row ``cy``, cell ``cx``.
    forward : numpy.ndarray
        ``[row, source, target]`` (8, 8, 8).
    """
    mixed = np.einsum("rsyx,rst->rtyx", cells.astype(np.float64), forward)
    return mixed.astype(np.float32)


def _crosstalk_forward(spec):
    if spec.crosstalk_file:
        return podi_crosstalk.read_crosstalk(spec.crosstalk_file)[0]
    return podi_crosstalk.default_crosstalk()[0]


def _write_ota_file(path, spec, instrument, ota, raw, gains, primary_cards):
    primary = fits.PrimaryHDU()
    primary.header.extend(primary_cards)
    primary.header["FILENAME"] = path.name
    primary.header["FPPOS"] = fppos_for_ota(ota)
    primary.header["OTA_ID"] = instrument.layout.serials[ota]
    primary.header["CELLMODE"] = instrument.cellmode(ota)
    hdus = [primary]
    b = spec.binning
    geometry = cell_geometry(b)
    rows, cols = geometry.raw_shape
    for cx, cy in all_cells():
        x1, y1 = cell_origin(cx, cy, b)
        cards = [("EXTNAME", cell_extname(cx, cy)), ("WN_CELLX", cx), ("WN_CELLY", cy),
                 ("GAIN", round(float(gains[cy, cx]), 4), "e-/ADU"), ("CCDSUM", f"{b} {b}"),
                 ("CCDBIN1", b), ("CCDBIN2", b),
                 ("DATASEC", f"[1:{geometry.science_cols},1:{geometry.science_rows}]"),
                 ("BIASSEC", f"[{geometry.overscan_cols[0] + 1}:{geometry.overscan_cols[1]},1:{rows}]"),
                 ("DETSEC", f"[{x1 + 1}:{x1 + geometry.science_cols},{y1 + 1}:{y1 + geometry.science_rows}]"),
                 ("LTV1", -x1), ("LTV2", -y1)]
        if (cx, cy) == (0, 7):
            cards += [("CRPIX1", 1.0), ("CRPIX2", 1.0)]
        hdus.append(fits.ImageHDU(raw[cy, cx], header=fits.Header(cards)))
    tmp = path.with_name(path.name + ".tmp")
    # The cards are built right above; astropy's verification would only cost time.
    fits.HDUList(hdus).writeto(tmp, overwrite=True, output_verify="ignore")
    os.replace(tmp, path)


def _primary_cards(spec, header_ra, header_dec, obsid):
    time = Time(spec.mjd, format="mjd", scale="utc")
    date, clock = time.isot.split("T")
    cards = fits.Header()
    cards["OBSID"] = obsid
    cards["OBSTYPE"] = spec.obstype
    cards["OBJECT"] = spec.object_name if spec.obstype == "OBJECT" else spec.obstype.lower()
    cards["FILTER"] = spec.filter
    cards["FILTERID"] = _FILTER_IDS.get(spec.filter, spec.filter)
    cards["FILTDSCR"] = f"{spec.filter} (simulated)"
    cards["EXPTIME"] = (float(spec.exptime) if spec.obstype != "BIAS" else 0.0, "s")
    cards["EXPMEAS"] = cards["EXPTIME"]
    cards["MJD-OBS"] = spec.mjd
    cards["DATE-OBS"] = time.isot
    cards["TIME-OBS"] = clock
    cards["RA"] = header_ra
    cards["DEC"] = header_dec
    cards["TARGRA"] = header_ra
    cards["TARGDEC"] = header_dec
    cards["TELRAOFF"] = 0.0
    cards["TELDECOF"] = 0.0
    cards["RADESYS"] = "ICRS"
    cards["EQUINOX"] = 2000.0
    cards["AIRMASS"] = spec.airmass
    cards["ZD"] = math.degrees(math.acos(1 / spec.airmass))
    # The rotator holds the sky still on the detector: the angle turns the optics only.
    cards["ROTSTART"] = (float(spec.rotator_angle), "deg")
    cards["ROTEND"] = (float(spec.rotator_angle), "deg")
    cards["ROTOFF"] = 0.0
    cards.update(_filter_arm_cards(spec.filter))
    cards["CCDBIN1"] = spec.binning
    cards["CCDBIN2"] = spec.binning
    cards["CCDSUM"] = f"{spec.binning} {spec.binning}"
    cards["DETSIZE"] = "[1:4036, 1:4015]"
    cards["TELFOCUS"] = 1000.0
    cards["ADCMODE"] = "OFF"
    cards["ADCANG1"] = 0.0
    cards["ADCANG2"] = 0.0
    cards["INSTRUME"] = "podi" if spec.layout == "podi" else "odi_5x6"
    cards["TELESCOP"] = "WIYN"
    cards["OBSERVAT"] = "KPNO"
    cards["ORIGIN"] = "podi_simulate"
    # The raw IRAF WCS the pipeline must replace (current wcslib rejects WAT cards).
    cards["CTYPE1"] = "RA---ZPX"
    cards["CTYPE2"] = "DEC--ZPX"
    cards["WAT0_001"] = "system=image"
    cards["WAT1_001"] = "wtype=zpx axtype=ra projp1=1. projp3=220."
    cards["WAT2_001"] = "wtype=zpx axtype=dec projp1=1. projp3=220."
    return cards


def _filter_arm_cards(filter_name):
    """``FLTARM<level><arm>`` cards: ``IN`` for the filter's arm, ``OUT`` for the others."""
    return {f"FLTARM{level}{arm}": "IN" if _FILTER_ARM.get(filter_name) == f"FLTARM{level}{arm}" else "OUT"
            for level in (1, 2, 3) for arm in "ABC"}


def exposure_name(spec):
    """Directory name ``o<YYYYMMDDThhmmss>.<sequence>`` of the exposure."""
    stamp = Time(spec.mjd, format="mjd", scale="utc").strftime("%Y%m%dT%H%M%S")
    return f"o{stamp}.{spec.sequence}"


def simulate_exposure(spec, outdir, ncpus=None):
    """Simulate one exposure and write it, its truth record and reference catalog.

    Parameters
    ----------
    spec : ExposureSpec
    outdir : str or Path
        Parent folder; the exposure directory is created inside it.
    ncpus : int, optional
        Worker processes (one OTA each); default all cores.

    Returns
    -------
    Path
        The exposure directory.
    """
    layout = layout_by_name(spec.layout)
    otas = tuple(spec.otas) if spec.otas else layout.otas
    unknown = set(otas) - set(layout.otas)
    if unknown:
        raise ValueError(f"OTAs {sorted(unknown)} do not exist in layout {layout.name}")
    if spec.pupilghost < 0:
        raise ValueError(f"pupil-ghost amplitude {spec.pupilghost} is negative")
    # Read the ghost's profile and the persistence sources now: bad ones fail before
    # anything is written.
    ghost = pupil_ghost(spec)
    persistence = persistence_charge(spec) if spec.persistence_from else None
    outdir = Path(outdir)
    name = exposure_name(spec)
    directory = outdir / name
    directory.mkdir(parents=True, exist_ok=True)

    # The header pointing as a string is what the truth is measured against.
    header_ra, header_dec = podi_wcs.format_pointing(*offset_pointing(spec.ra, spec.dec, spec.pointing_error))
    true_ra, true_dec = podi_wcs.parse_pointing({"RA": podi_wcs.format_pointing(spec.ra, spec.dec)[0],
                                                 "DEC": podi_wcs.format_pointing(spec.ra, spec.dec)[1]})
    spec = dataclasses.replace(spec, ra=true_ra, dec=true_dec)
    hdr_ra, hdr_dec = podi_wcs.parse_pointing({"RA": header_ra, "DEC": header_dec})

    stars = star_field(spec) if spec.obstype == "OBJECT" else star_field(
        dataclasses.replace(spec, star_density=0))
    cards = _primary_cards(spec, header_ra, header_dec, name[1:])
    wcs_headers = {ota: true_ota_wcs(spec, ota) for ota in otas}
    jobs = [(spec, ota, stars, wcs_headers[ota], directory / f"{name}.{ota:02d}.fits", cards)
            for ota in otas]
    workers = max(1, min(ncpus or os.cpu_count() or 1, len(jobs)))
    if workers == 1:
        results = [simulate_ota(*job) for job in jobs]
    else:
        with ProcessPoolExecutor(workers) as pool:
            results = list(pool.map(simulate_ota, *zip(*jobs)))
    write_truth(outdir / f"{name}.truth.fits", spec, otas, stars, results, wcs_headers,
                (hdr_ra, hdr_dec), ghost, persistence)
    if spec.obstype == "OBJECT":
        rng = np.random.default_rng([spec.seed, 99])
        reference_catalog(stars, rng).write(outdir / f"{name}.refcat.fits", overwrite=True)
    logger.info("simulated %s: %d OTAs, binning %d", directory, len(otas), spec.binning)
    return directory


def offset_pointing(ra, dec, offset):
    """Pointing ``(ra, dec)`` (degrees) moved by ``offset = (dRA cos(dec), dDec)`` in arcsec."""
    return (ra + offset[0] / 3600 / math.cos(math.radians(dec))) % 360, dec + offset[1] / 3600


def dithered(spec, arcsec):
    """The exposure ``spec`` as one of a dithered sequence around its pointing.

    Parameters
    ----------
    spec : ExposureSpec
        Its ``ra, dec`` is the sequence's pointing; the offset is drawn from its seed.
        Exposures of one sequence share ``field_seed`` to see the same stars.
    arcsec : float
        Half-width of the uniform offset in ``dRA cos(dec)`` and in ``dDec``.

    Returns
    -------
    ExposureSpec
        True pointing moved by the offset; the star field stays centred on the
        sequence's pointing, so that every exposure of the sequence sees the same sky.
    """
    offset = np.random.default_rng([spec.seed, 5]).uniform(-arcsec, arcsec, 2)
    ra, dec = offset_pointing(spec.ra, spec.dec, offset)
    return dataclasses.replace(spec, ra=ra, dec=dec, field_centre=spec.field_centre or (spec.ra, spec.dec))


def true_ota_wcs(spec, ota):
    """Header of the true WCS of an OTA: the model's distortion at the true pointing,
    rotated by the rotator error and departing from the canned model by the spec's
    ``ota_offsets`` (a seeded shift and rotation per OTA), ``scale_error`` and
    ``cubic_distortion`` (TPV terms x r^2 and y r^2)."""
    canned = podi_wcs.model_canned_wcs(layout_by_name(spec.layout))
    header = podi_wcs.ota_wcs_header(_canned_extension(canned, ota), spec.ra, spec.dec, spec.binning)
    if not spec.effects.distortion:
        for key in [k for k in header if k.startswith("PV")]:
            del header[key]
        header["PV1_1"] = 1.0
        header["PV2_1"] = 1.0
    angle = math.radians(spec.rotator_error)
    scale = 1.0 + spec.scale_error
    if spec.ota_offsets:
        rng = np.random.default_rng([spec.seed, 9, ota])
        pixel = PIXEL_SCALE * spec.binning
        shift = rng.normal(0.0, spec.ota_offsets / pixel, 2)
        header["CRPIX1"] += shift[0]
        header["CRPIX2"] += shift[1]
        # A rotation that moves the OTA's edge (half a side from its centre) by a fifth of
        # ota_offsets (rms): a few hundredths of a degree, as OTAs sit in a real camera.
        half_side = 0.5 * cell_geometry(spec.binning).ota_size * pixel
        angle += rng.normal(0.0, spec.ota_offsets / 5 / half_side)
    if angle or scale != 1.0:
        rotation = scale * np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
        cd = np.array([[header["CD1_1"], header["CD1_2"]], [header["CD2_1"], header["CD2_2"]]])
        (header["CD1_1"], header["CD1_2"]), (header["CD2_1"], header["CD2_2"]) = rotation @ cd
    if spec.cubic_distortion:
        # TPV: PV1_7 x^3, PV1_9 x y^2 (xi); PV2_7 y^3, PV2_9 y x^2 (eta): together k r^2 (x, y).
        for key in ("PV1_7", "PV1_9", "PV2_7", "PV2_9"):
            header[key] = header.get(key, 0.0) + spec.cubic_distortion
    return header


def _canned_extension(canned, ota):
    return canned[f"OTA{ota:02d}.SCI"].header


def binned_flat(instrument, ota, binning):
    """8x8-binned flat / gain and flat of an OTA's used cells: what defines a flat's level."""
    used = [c for c in all_cells() if c not in broken_cells(instrument.layout, ota)]
    flat = instrument.flat(ota, binning)
    gain_map = _cell_map(instrument.gains(ota), binning, used)
    return bin_image(flat / gain_map, 8), bin_image(np.where(np.isfinite(gain_map), flat, np.nan), 8)


def true_flat_level(spec, otas, binned=None):
    """Level of the master flat that the pipeline would make from this camera.

    Parameters
    ----------
    binned : dict, optional
        OTA -> :func:`binned_flat` result, where already known.

    Returns
    -------
    (float, float)
        Normalisation of flat/gain (output in ADU) and of the flat alone (``-gain``).
    """
    layout = layout_by_name(spec.layout)
    instrument = Instrument(layout, spec.instrument_seed, spec.effects)
    chosen = [ota for ota in otas if ota in otas_to_normalize_flat(spec.filter, layout)] or list(otas)
    binned = binned or {}
    pairs = [binned[ota] if ota in binned else binned_flat(instrument, ota, spec.binning) for ota in chosen]
    return (flat_normalisation_level([adu for adu, _ in pairs]),
            flat_normalisation_level([electrons for _, electrons in pairs]))


def _cell_map(values, binning, used):
    """OTA array holding ``values[cy, cx]`` in the science section of each used cell."""
    size = cell_geometry(binning).ota_size
    image = np.full((size, size), np.nan, np.float32)
    for cx, cy in used:
        image[cell_to_ota(cx, cy, binning)] = values[cy, cx]
    return image


def write_true_calibrations(spec, outdir, gain=False):
    """Write perfect master bias, dark and flat (and fringe template) of the simulated camera.

    They are what ``podi_makecalibrations`` would make from infinitely many frames:
    tests reduce with them to see the noise of the science frame alone.

    Parameters
    ----------
    spec : ExposureSpec
        Layout, OTAs, binning, filter; the dark is for ``spec.exptime`` seconds. With
        ``spec.fringe_amplitude > 0`` the fringe template ``fringe__<FILTER>.fits`` is
        written too: per OTA the unit pattern P (:meth:`Instrument.fringe_pattern`),
        i.e. ``(image - sky) / sky`` of fringe light with amplitude 1, at ``spec.binning``.
        With ``spec.pupilghost > 0`` the true pupil-ghost template
        (:func:`true_pupilghost_template`) is written too, under
        :func:`podi_calibfiles.pupilghost_template_name` of the filter's arm level and
        ``spec.binning``, with an extension for each simulated ghost OTA (all of
        :data:`podi_pupilghost.GHOST_OTAS` if none is simulated); the flat's ghost
        OTAs then carry ``PGAFCTD = T``: the true flat is free of the ghost, as a
        pupil-ghost-corrected master flat is.
    gain : bool
        Masters for data in electrons (``-gain``) instead of ADU.

    Returns
    -------
    dict
        ``bias``, ``dark``, ``flat`` (and ``fringe``, ``pupilghost``) -> Path.
    """
    Path(outdir).mkdir(parents=True, exist_ok=True)
    layout = layout_by_name(spec.layout)
    instrument = Instrument(layout, spec.instrument_seed, spec.effects)
    otas = [ota for ota in layout.output_order if ota in (spec.otas or layout.otas)]
    norm_adu, norm_e = true_flat_level(spec, otas)
    geometry = cell_geometry(spec.binning)
    rows, cols = slice(0, geometry.science_rows), slice(0, geometry.science_cols)
    images = {"bias": {}, "dark": {}, "flat": {}}
    for ota in otas:
        used = [c for c in all_cells() if c not in broken_cells(layout, ota)]
        gains = instrument.gains(ota)
        to_output = _cell_map(gains if gain else np.ones_like(gains), spec.binning, used)
        structure = instrument.bias_structure(ota, spec.binning, geometry.raw_shape)
        bias = np.full_like(to_output, np.nan)
        for cx, cy in used:
            bias[cell_to_ota(cx, cy, spec.binning)] = structure[cy, cx, rows, cols]
        images["bias"][ota] = bias * to_output
        adu_per_e = to_output / _cell_map(gains, spec.binning, used)
        images["dark"][ota] = instrument.dark_current(ota, spec.binning) * spec.exptime * adu_per_e
        images["flat"][ota] = instrument.flat(ota, spec.binning) * adu_per_e / (norm_e if gain else norm_adu)
    primaries = {kind: master_primary(kind, spec.binning, spec.exptime if kind == "dark" else 0.0,
                                      spec.mjd, 1.0 if gain else 1.0 / norm_adu, spec.filter)
                 for kind in images}
    if spec.fringe_amplitude > 0:
        images["fringe"] = {ota: instrument.fringe_pattern(ota, spec.binning) for ota in otas}
        primaries["fringe"] = fringe_primary(spec.binning, spec.mjd, spec.filter)
    ghost_otas = [ota for ota in otas if ota in podi_pupilghost.GHOST_OTAS]
    # The true flat is free of the ghost, as a pupil-ghost-corrected master flat is.
    ghost_free = {"PGAFCTD": (True, "pupil ghost removed")} if spec.pupilghost > 0 else {}
    written = {}
    for kind, by_ota in images.items():
        primary = primaries[kind]
        primary["TRUTH"] = (True, "made from the simulator's truth")
        hdus = [fits.PrimaryHDU(header=primary)] + \
            [master_extension(ota, data, **(ghost_free if kind == "flat" and ota in ghost_otas else {}))
             for ota, data in by_ota.items()]
        path = Path(outdir) / master_name(kind, spec.binning, spec.filter)
        write_atomic(fits.HDUList(hdus), path)
        written[kind] = path
    if spec.pupilghost > 0:
        level = filter_level(_filter_arm_cards(spec.filter))
        path = Path(outdir) / pupilghost_template_name(level, spec.binning)
        podi_pupilghost.write_template(
            path, true_pupilghost_template(spec), otas=ghost_otas or podi_pupilghost.GHOST_OTAS,
            primary_cards={"FILTER": spec.filter, "FLTLEVEL": (level, "filter arm level"),
                           "BINNING": spec.binning, "MJD-OBS": spec.mjd,
                           "TRUTH": (True, "made from the simulator's truth")})
        written["pupilghost"] = path
    return written


def write_truth(filename, spec, otas, stars, results, wcs_headers, header_pointing, ghost,
                persistence=None):
    """Write the truth record of an exposure (see module docstring).

    ``ghost`` is the exposure's :class:`PupilGhost`; ``persistence`` the
    :func:`persistence_charge` of the simulated OTAs, None without persistence.
    """
    primary = fits.PrimaryHDU()
    h = primary.header
    h["OBSTYPE"] = spec.obstype
    h["LAYOUT"] = spec.layout
    h["BINNING"] = spec.binning
    h["FILTER"] = spec.filter
    h["EXPTIME"] = exposure_length(spec)
    h["MJDEND"] = (spec.mjd + exposure_length(spec) / 86400, "end of the exposure (MJD)")
    h["SEED"] = spec.seed
    h["INSTSEED"] = spec.instrument_seed
    h["TRUE_RA"] = (spec.ra, "true pointing = tangent point (deg)")
    h["TRUE_DEC"] = (spec.dec, "true pointing = tangent point (deg)")
    h["HDR_RA"] = (header_pointing[0], "pointing the header RA string encodes (deg)")
    h["HDR_DEC"] = (header_pointing[1], "pointing the header DEC string encodes (deg)")
    h["ROTERR"] = (spec.rotator_error, "rotator error (deg)")
    h["OTAOFFS"] = (spec.ota_offsets, "rms of the OTAs' own shifts (arcsec)")
    h["SCALEERR"] = (spec.scale_error, "fractional plate-scale error of the model")
    h["CUBICDST"] = (spec.cubic_distortion, "radial k r^3 added to the model distortion")
    h["FWHM"] = (spec.fwhm, "Moffat FWHM (arcsec)")
    h["MOFFBETA"] = (spec.moffat_beta, "Moffat beta")
    for key, value in dataclasses.asdict(spec.effects).items():
        h[f"EFF_{key[:4].upper()}"] = (value, f"effect {key}")
    if spec.obstype == "OBJECT":
        binned = {ota: result["binned_flat"] for ota, result in zip(otas, results)}
        norm_adu, norm_e = true_flat_level(spec, otas, binned)
        zp_e = ZP_E[spec.filter]
        aperture = moffat_enclosed(1.5, spec.fwhm, spec.moffat_beta)
        sky_e = sky_electrons(spec)
        h["ZP_E"] = (zp_e, "mag of 1 e-/s total flux")
        h["FLATNRMA"] = (norm_adu, "master-flat level of flat/gain (ADU per e-)")
        h["FLATNRME"] = (norm_e, "master-flat level of the flat (with -gain)")
        h["PHOTZPT"] = (zp_e + 2.5 * math.log10(norm_adu), "true ZP, total flux, ADU/s")
        h["APFRAC3"] = (aperture, "flux fraction in a 3 arcsec diameter aperture")
        h["PHOTZP3"] = (h["PHOTZPT"] + 2.5 * math.log10(aperture), "true ZP, 3\" aperture, ADU/s")
        h["SKY_E"] = (sky_e, "sky per pixel in the exposure (e-)")
        h["SKY_ADU"] = (sky_e * norm_adu, "true sky in reduced ADU")
        h["FRNGAMP"] = (spec.fringe_amplitude, "fringe light per unit pattern / sky")
        h["FRNGSCL"] = (spec.fringe_amplitude * h["SKY_ADU"], "reduced ADU per unit pattern")
    if spec.obstype in ("OBJECT", "DFLAT"):
        h["PGAMP"] = (ghost.amplitude, "pupil-ghost amplitude (x radial profile)")
        h["PGPEAK"] = (ghost.peak, "ghost profile peak / background (no dipole)")
        h["PGCNTR_X"] = (ghost.centre[0], "true ghost centre x (focal plane px)")
        h["PGCNTR_Y"] = (ghost.centre[1], "true ghost centre y (focal plane px)")
        h["PGRADIUS"] = (ghost.inner_radius, "ghost inner edge, half max (unbinned px)")
        h["PGROTANG"] = (ghost.rotator, "ROTSTART (deg)")
        h["PGDIPOLE"] = (PUPILGHOST_DIPOLE, "relative amplitude of the ghost's dipole")
        h["PGDIPANG"] = (ghost.dipole_angle, "direction of the dipole's bright side (deg)")
    if spec.obstype == "OBJECT":
        # Reduced ghost = sky_e G FLATNRMA = SKY_ADU G, and the true template is G.
        h["PGSCALE"] = (h["SKY_ADU"], "reduced ADU per unit of the true ghost template")
    if spec.obstype == "OBJECT" and spec.moving is not None:
        _moving_target_cards(h, spec)
    on_otas = vstack([r["stars"] for r in results])
    index = np.asarray(on_otas["index"], int)
    star_table = Table({"ra": stars["ra"][index], "dec": stars["dec"][index],
                        "mag": stars[FILTER_BAND.get(spec.filter, "r")][index],
                        "ota": on_otas["ota"], "x": on_otas["x"], "y": on_otas["y"],
                        "flux_e": on_otas["flux"]})
    hdus = [primary, fits.BinTableHDU(star_table, name="STARS")]
    hdus.append(fits.BinTableHDU(vstack([r["cells"] for r in results]), name="CELLS"))
    hdus.append(fits.BinTableHDU(vstack([r["saturated"] for r in results]), name="SATURATED"))
    if persistence is not None:
        h["PERSA1"] = (PERSISTENCE_A1, "persistence fast rate (e-/s/unbinned px)")
        h["PERST1"] = (PERSISTENCE_TAU1, "persistence fast decay time (s)")
        h["PERSA2"] = (PERSISTENCE_A2, "persistence slow rate (e-/s/unbinned px)")
        h["PERST2"] = (PERSISTENCE_TAU2, "persistence slow decay time (s)")
        simulated = persistence[np.isin(persistence["ota"], otas)]
        hdus.append(fits.BinTableHDU(simulated, name="PERSIST"))
    for ota in otas:
        hdus.append(fits.ImageHDU(header=wcs_headers[ota], name=f"OTA{ota:02d}.WCS"))
    fits.HDUList(hdus).writeto(filename, overwrite=True)


def _moving_target_cards(header, spec):
    """Truth cards of the moving target: position at MJD-OBS, motion, where it falls."""
    ra, dec = moving_target(spec)
    # Every OTA of the focal plane: the target may fall on one that was not simulated.
    ota, x, y = moving_target_pixel(spec, layout_by_name(spec.layout).otas)
    header["MOVRA"] = (ra, "moving target RA at MJD-OBS (deg)")
    header["MOVDEC"] = (dec, "moving target Dec at MJD-OBS (deg)")
    header["MOVEPOCH"] = (spec.moving_epoch if spec.moving_epoch is not None else spec.mjd,
                          "MJD of the moving target's start position")
    header["MOVDRA"] = (spec.moving[0], "moving target dRA*cos(dec) (arcsec/h)")
    header["MOVDDEC"] = (spec.moving[1], "moving target dDec (arcsec/h)")
    header["MOVOTA"] = (ota, "OTA the moving target falls on; -1: in a gap")
    header["MOVX"] = (x, "moving target 0-based x on MOVOTA (binned px)")
    header["MOVY"] = (y, "moving target 0-based y on MOVOTA (binned px)")


# --- Command line -----------------------------------------------------------------

def build_parser():
    parser = argparse.ArgumentParser(
        prog="podi_simulate",
        description="Write simulated raw ODI exposures with a truth record.")
    parser.add_argument("outdir", help="folder to write the exposure directory into")
    parser.add_argument("--obstype", default="OBJECT", choices=("OBJECT", "BIAS", "DARK", "DFLAT"))
    parser.add_argument("--layout", default="podi", choices=("podi", "odi_5x6"))
    parser.add_argument("--otas", default=None, help="comma-separated OTAs (default: all)")
    parser.add_argument("--binning", type=int, default=1, choices=(1, 2))
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--count", type=int, default=1,
                        help="number of exposures (seeds and sequence numbers count up)")
    parser.add_argument("--dither", type=float, default=0.0, metavar="ARCSEC",
                        help="offset each exposure's true pointing from --ra/--dec at random, "
                             "uniformly within +-ARCSEC in dRA*cos(dec) and dDec (same star field)")
    parser.add_argument("--interval", type=float, default=60.0, metavar="SECONDS",
                        help="time between the starts of the exposures of a --count sequence; "
                             "each exposure gets the persistence of the earlier ones that ended "
                             "before it starts (so make SECONDS >= --exptime)")
    parser.add_argument("--exptime", type=float, default=300.0)
    parser.add_argument("--filter", default="odi_r", choices=sorted(ZP_E))
    parser.add_argument("--mjd", type=float, default=None,
                        help="MJD-OBS (default 56620.1 for podi, 57500.1 for odi_5x6)")
    parser.add_argument("--ra", type=float, default=150.0, help="true pointing RA (deg)")
    parser.add_argument("--dec", type=float, default=30.0, help="true pointing Dec (deg)")
    parser.add_argument("--pointing-error", default="0,0",
                        help="header minus true pointing, 'dRA*cos(dec),dDec' in arcsec")
    parser.add_argument("--rotator-error", type=float, default=0.0, help="degrees")
    parser.add_argument("--star-density", type=float, default=4000.0,
                        help="stars per square degree brighter than mag 22")
    parser.add_argument("--fwhm", type=float, default=1.0, help="seeing FWHM (arcsec)")
    parser.add_argument("--sky", type=float, default=None, help="sky e-/s per unbinned pixel")
    parser.add_argument("--fringes", type=float, default=0.0, metavar="AMPLITUDE",
                        help="add the camera's fringe pattern (rms 1) times AMPLITUDE x sky "
                             "to object frames")
    parser.add_argument("--flat-level", type=float, default=30000.0, help="DFLAT level (ADU)")
    parser.add_argument("--rotator", type=float, default=0.0, metavar="DEG",
                        help="rotator angle ROTSTART: turns the optics and the pupil ghost, not the sky")
    parser.add_argument("--pupilghost", type=float, default=0.0, metavar="AMPLITUDE",
                        help="add the pupil ghost, AMPLITUDE x radial profile x sky (object frames) "
                             "or lamp (DFLAT)")
    parser.add_argument("--pupilghost-profile", default=None, metavar="FILE",
                        help="radial pupil-ghost profile: lines 'radius fraction', radius in 4x4-binned "
                             "pixels (default: built-in, like odi_r)")
    parser.add_argument("--moving", default=None, metavar="dRA,dDec",
                        help="add a moving target (object frames) moving at dRA*cos(dec),dDec "
                             "arcsec/hour, starting 0.05 deg north-east of the field centre")
    parser.add_argument("--persistence-from", default=None, metavar="FILES",
                        help="comma-separated truth files of earlier exposures (same binning) "
                             "whose saturated pixels release charge into these exposures")
    parser.add_argument("--crosstalk", default=None, help="crosstalk matrix file (XTALK.FWD)")
    parser.add_argument("--ncpus", type=int, default=None)
    parser.add_argument("--write-nonlinearity", metavar="DIR", default=None,
                        help="also write the camera's nonlinearity table and history to DIR")
    for effect in dataclasses.fields(Effects):
        parser.add_argument(f"--no-{effect.name.replace('_', '-')}", action="store_true",
                            help=f"switch off: {effect.name}")
    return parser


def spec_from_args(args):
    effects = Effects(**{f.name: not getattr(args, f"no_{f.name}") for f in dataclasses.fields(Effects)})
    mjd = args.mjd if args.mjd is not None else (56620.1 if args.layout == "podi" else 57500.1)
    otas = tuple(int(o) for o in args.otas.split(",")) if args.otas else None
    error = tuple(float(v) for v in args.pointing_error.split(","))
    moving = _parse_rate(args.moving) if args.moving is not None else None
    persistence = tuple(args.persistence_from.split(",")) if args.persistence_from else ()
    return ExposureSpec(obstype=args.obstype, layout=args.layout, otas=otas, binning=args.binning,
                        seed=args.seed, exptime=args.exptime, filter=args.filter, mjd=mjd,
                        ra=args.ra, dec=args.dec, pointing_error=error,
                        rotator_error=args.rotator_error, star_density=args.star_density,
                        fwhm=args.fwhm, sky_rate=args.sky, fringe_amplitude=args.fringes,
                        flat_level=args.flat_level, rotator_angle=args.rotator,
                        pupilghost=args.pupilghost, pupilghost_profile=args.pupilghost_profile,
                        crosstalk_file=args.crosstalk, moving=moving, persistence_from=persistence,
                        effects=effects)


def _parse_rate(text):
    """``'dRA,dDec'`` (arcsec/hour) as a pair of floats; ValueError with the bad text."""
    try:
        dra, ddec = (float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--moving expects 'dRA,dDec' in arcsec/hour, got {text!r}") from None
    return dra, ddec


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)
    try:
        spec = spec_from_args(args)
        if spec.moving is not None:
            # The target's path is one for the whole sequence: it starts at the first exposure.
            spec = dataclasses.replace(spec, moving_epoch=spec.mjd)
        earlier = []  # (truth file, end MJD) of the sequence's exposures so far
        for i in range(args.count):
            mjd = spec.mjd + i * args.interval / 86400
            # The sequence's own history; exposures that overlap this one (--interval
            # shorter than --exptime) cannot have left charge before it started.
            history = tuple(str(truth) for truth, end in earlier
                            if (mjd - end) * 86400 >= -TIME_TOLERANCE)
            if len(history) < len(earlier):
                logger.warning("exposure %d overlaps earlier ones (--interval %g s): no persistence "
                               "from those", i + 1, args.interval)
            this = dataclasses.replace(spec, seed=spec.seed + i, sequence=i + 1, mjd=mjd,
                                       field_seed=spec.seed,
                                       persistence_from=spec.persistence_from + history)
            if args.dither:
                this = dithered(this, args.dither)
            directory = simulate_exposure(this, args.outdir, args.ncpus)
            earlier.append((directory.parent / f"{directory.name}.truth.fits",
                            mjd + exposure_length(this) / 86400))
            print(directory)
        if args.write_nonlinearity:
            layout = layout_by_name(spec.layout)
            Instrument(layout, spec.instrument_seed).write_nonlinearity_table(
                args.write_nonlinearity, spec.otas or layout.otas)
    except (ValueError, OSError) as error:
        print(f"podi_simulate: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
