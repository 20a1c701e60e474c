"""Pupil-ghost templates from dome flats, and flats with the ghost divided out.

A master flat of the central OTAs is, per pixel, ``c_cell x v(x, y) x (1 + T)``: the
response of the pixel's cell (each cell has its own gain and quantum efficiency),
a smooth illumination ``v`` and the pupil ghost ``T`` (a fraction of the lamp
light, :mod:`podi_pupilghost`). The ghost cannot be told from a cell's response
within one cell; it can over the focal plane, because it is one ring shared by
the cells it crosses and is zero inside its inner edge and beyond its outer edge.
:func:`fit_flat_ghost` therefore fits, in blocks of :data:`podi_pupilghost.BLOCK_SIZE`
unbinned pixels that lie within one cell, ::

    log(flat) = log c_cell + (quadratic in x, y) + log(1 + T)

by linear least squares, where ``log(1 + T)`` is free in radial bins of
:data:`podi_pupilghost.RADIAL_STEP` (a mean and a dipole ``cos``/``sin`` term each)
between :data:`PROFILE_RADII`, or, with a given template, ``s x template``. The
ghost's centre comes from the wedge fit of :func:`podi_pupilghost.fit_ghost` on the
flat with the cells and illumination divided out, and the two steps alternate
until the centre is stable. :func:`remove_flat_ghost` divides the fitted ghost out
of the flat's OTAs.

Coordinates and angles are those of :mod:`podi_pupilghost`.
"""

import logging
import math
from dataclasses import dataclass

import numpy as np
from scipy import sparse

import podi_pupilghost as pg
from podi_definitions import N_CELLS, cell_to_ota

logger = logging.getLogger(__name__)

#: Radii (unbinned px from the centre) where the fitted ghost may be non-zero.
PROFILE_RADII = (1000.0, 3750.0)
#: Centre iterations stop when the centre moves less than this (unbinned px) ...
CENTRE_TOLERANCE = 0.3
#: ... or after this many fits.
MAX_ITERATIONS = 6
#: Blocks whose residual exceeds this many robust standard deviations are refitted without.
RESIDUAL_CLIP = 5.0


@dataclass
class FlatGhost:
    """The ghost found in a flat.

    Attributes
    ----------
    template : podi_pupilghost.GhostTemplate
        The fitted ghost (free fit), or the given template.
    scale : float
        Factor of ``template`` in the flat (1 for a free fit).
    centre : tuple of float
        Focal-plane position of the ghost's centre in the flat.
    angle : float
        Degrees ``template`` is turned by in the flat.
    found : bool
        Whether the centre iterations converged.
    """

    template: pg.GhostTemplate
    scale: float
    centre: tuple
    angle: float
    found: bool


def _cell_index(binning, size):
    """OTA array of cell numbers ``cx + 8 cy``, -1 between cells."""
    index = np.full((size, size), -1, np.int16)
    for cy in range(N_CELLS):
        for cx in range(N_CELLS):
            index[cell_to_ota(cx, cy, binning)] = cx + N_CELLS * cy
    return index


def flat_blocks(flats, binning):
    """Log block means of the flats' OTAs, their coordinates and cells.

    Only blocks of one cell with a positive mean count.

    Parameters
    ----------
    flats : dict
        OTA -> flat image (any positive scale).

    Returns
    -------
    (numpy.ndarray, numpy.ndarray, numpy.ndarray, numpy.ndarray)
        ``log`` block means, focal-plane x and y, and a cell number unique over the OTAs.
    """
    values, xs, ys, cells = [], [], [], []
    for number, (ota, image) in enumerate(sorted(flats.items())):
        blocks, x, y = pg.block_means(image, ota, binning)
        factor = max(1, pg.BLOCK_SIZE // binning)
        index = _cell_index(binning, image.shape[0])[:blocks.shape[0] * factor, :blocks.shape[1] * factor]
        grouped = index.reshape(blocks.shape[0], factor, blocks.shape[1], factor)
        low, high = grouped.min(axis=(1, 3)), grouped.max(axis=(1, 3))
        with np.errstate(invalid="ignore"):
            keep = (low == high) & (low >= 0) & (blocks > 0)
        values.append(np.log(blocks[keep]))
        xs.append(np.broadcast_to(x, blocks.shape)[keep])
        ys.append(np.broadcast_to(y, blocks.shape)[keep])
        cells.append(low[keep].astype(np.intp) + number * N_CELLS * N_CELLS)
    return tuple(np.concatenate(v) for v in (values, xs, ys, cells))


def _design(x, y, cells, centre, template, angle):
    """Sparse design matrix: cells, quadratic illumination, then the ghost's columns.

    Returns the matrix and the number of leading cell and illumination columns.
    """
    rows = np.arange(x.size)
    _, cell_column = np.unique(cells, return_inverse=True)
    n_fixed = cell_column.max() + 1 + 5
    u, v = x / 4000.0, y / 4000.0
    entries = [(rows, cell_column, np.ones(x.size))]
    entries += [(rows, np.full(x.size, n_fixed - 5 + k), term)
                for k, term in enumerate((u, v, u * u, u * v, v * v))]
    if template is None:
        radius = np.hypot(x - centre[0], y - centre[1])
        theta = np.arctan2(y - centre[1], x - centre[0])
        ring = np.floor((radius - pg.PROFILE_RADII[0]) / pg.RADIAL_STEP).astype(np.intp)
        inside = (radius >= PROFILE_RADII[0]) & (radius < PROFILE_RADII[1])
        for k, term in enumerate((np.ones(x.size), np.cos(theta), np.sin(theta))):
            entries.append((rows[inside], n_fixed + 3 * ring[inside] + k, term[inside]))
        n_columns = n_fixed + 3 * pg.profile_radii().size
    else:
        entries.append((rows, np.full(x.size, n_fixed), template.sample(x, y, centre, angle)))
        n_columns = n_fixed + 1
    row, column, value = (np.concatenate(parts) for parts in zip(*entries))
    return sparse.csr_matrix((value, (row, column)), shape=(x.size, n_columns)), n_fixed


def _solve(design, values):
    """Least squares with one refit after clipping outliers; returns coefficients and residuals."""
    keep = np.ones(values.size, bool)
    for _ in range(2):
        used = design[keep]
        normal = (used.T @ used).toarray()
        # Radial bins no block falls in have empty columns: a ridge there makes them 0.
        # Any ridge on the other columns would pull the fit's weakest mode (the ghost
        # against the cells inside its ring) towards an answer that depends on the
        # flat's units.
        diagonal = np.diag_indices_from(normal)
        normal[diagonal] += np.where(normal[diagonal] > 0, 0.0, 1.0)
        coefficients = np.linalg.solve(normal, used.T @ values[keep])
        residual = values - design @ coefficients
        sigma = 1.4826 * np.median(np.abs(residual[keep]))
        keep = np.abs(residual) <= RESIDUAL_CLIP * sigma
    return coefficients, residual


def _free_template(coefficients, centre, rotator, dipole=True):
    """The fitted radial-harmonic ghost as a :class:`podi_pupilghost.GhostTemplate`.

    Without ``dipole`` only its azimuthal mean: around a trial centre that is off by
    ``d``, a ring's dipole terms take up ``-d . grad`` of its mean profile, a shift
    the centre fit must see instead.
    """
    radii = pg.profile_radii()
    mean, cosine, sine = coefficients.reshape(-1, 3).T
    if not dipole:
        cosine, sine = np.zeros_like(cosine), np.zeros_like(sine)
    half = int(math.ceil(pg.GHOST_OUTER_RADIUS / pg.TEMPLATE_STEP))
    grid = np.arange(-half, half + 1) * pg.TEMPLATE_STEP
    radius = np.hypot(grid[None, :], grid[:, None])
    theta = np.arctan2(grid[:, None], grid[None, :])
    inside = (radius >= PROFILE_RADII[0]) & (radius < PROFILE_RADII[1])

    def profile(terms):
        return np.interp(radius, radii, terms)

    log_ghost = profile(mean) + profile(cosine) * np.cos(theta) + profile(sine) * np.sin(theta)
    image = np.where(inside, np.expm1(log_ghost), 0.0).astype(np.float32)
    peak = np.max(mean)
    edge = radii[np.argmax(mean >= peak / 2)] if peak > 0 else math.nan
    return pg.GhostTemplate(image, pg.TEMPLATE_STEP, tuple(map(float, centre)), rotator, float(edge))


def fit_flat_ghost(flats, binning, rotator, template=None, centre=(0.0, 0.0)):
    """Find the pupil ghost in a master flat.

    Parameters
    ----------
    flats : dict
        OTA -> flat image of the OTAs the ghost falls on (any positive scale).
    binning : int
    rotator : float
        ``ROTSTART`` of the flats (degrees).
    template : podi_pupilghost.GhostTemplate, optional
        Fit this template's scale and centre instead of a free ghost.
    centre : (float, float)
        Where to start looking (focal plane); a template's nominal centre if given.

    Returns
    -------
    FlatGhost
    """
    values, x, y, cells = flat_blocks(flats, binning)
    angle = 0.0 if template is None else rotator - template.rotator
    centre = template.centre if template is not None else tuple(centre)
    found = False
    for _ in range(MAX_ITERATIONS):
        design, n_fixed = _design(x, y, cells, centre, template, angle)
        coefficients, residual = _solve(design, values)
        ghost_columns = coefficients[n_fixed:]
        fitted = template if template is not None else _free_template(ghost_columns, centre, rotator,
                                                                           dipole=False)
        # The flat with the cells and the illumination divided out: 1 + ghost.
        flattened = np.exp(design[:, n_fixed:] @ ghost_columns + residual)
        profiles = [pg.wedge_profiles(flattened[cells // 64 == n], x[cells // 64 == n],
                                      y[cells // 64 == n], centre, ota)
                    for n, ota in enumerate(sorted(flats))]
        fit = pg.fit_ghost(profiles, {ota: fitted for ota in flats}, angle)
        if not fit.found:
            break
        if math.hypot(fit.centre[0] - centre[0], fit.centre[1] - centre[1]) < CENTRE_TOLERANCE:
            # Converged: the fit just made, at this centre, stands.
            found = True
            break
        centre = fit.centre
    if not found:
        design, n_fixed = _design(x, y, cells, centre, template, angle)
        coefficients, _ = _solve(design, values)
    if template is None:
        return FlatGhost(_free_template(coefficients[n_fixed:], centre, rotator), 1.0, centre, 0.0, found)
    return FlatGhost(template, float(coefficients[n_fixed]), centre, angle, found)


def remove_flat_ghost(flats, ghost, binning):
    """Divide the ghost out of flat images in place; return the keywords of each OTA.

    Returns
    -------
    dict
        OTA -> ``{keyword: (value, comment)}``: ``PGAFCTD``, ``PGEFCTVX/Y`` (the ghost's
        centre, 1-based OTA pixels), ``PGSCALNG``, ``PGROTANG``.
    """
    keywords = {}
    for ota, image in flats.items():
        region = pg.ghost_region(ota, binning, image.shape, ghost.centre)
        if region is None:
            continue
        part = image[region]
        for start, block in pg.render_template(ghost.template, ota, binning, region, ghost.centre,
                                               ghost.angle):
            block *= np.float32(ghost.scale)
            block += np.float32(1.0)
            part[start:start + block.shape[0]] /= block
        x, y = pg.focal_plane_to_pixel(ota, binning, *ghost.centre)
        keywords[ota] = {
            "PGAFCTD": (True, "pupil ghost divided out of this flat"),
            "PGEFCTVX": (round(float(x) + 1, 2), "ghost centre x in the flat (1-based px)"),
            "PGEFCTVY": (round(float(y) + 1, 2), "ghost centre y in the flat (1-based px)"),
            "PGSCALNG": (ghost.scale, "scale of the template divided out"),
            "PGROTANG": (ghost.angle, "template turned by (deg)")}
    return keywords
