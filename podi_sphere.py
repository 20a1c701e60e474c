"""Positions on the celestial sphere: unit vectors, distances, matching.

Pure geometry, shared by the reference catalogs (:mod:`podi_ipprefcat`), the
astrometric calibration (:mod:`podi_fixwcs`), the photometric calibration
(:mod:`podi_photcalib`), the canned WCS (:mod:`podi_wcs`) and the QA plots.

Conventions: RA and Dec in degrees (RA returned modulo 360); distances are true
great-circle angles, so RA 0/360 and the poles need no special care. Tangent-plane
(standard) coordinates (xi, eta) are in degrees, xi growing to the east (along RA),
eta to the north.
"""

import math

import numpy as np

# --- Directions and distances --------------------------------------------------------------

def unit_vectors(ra, dec):
    """Unit vectors (3, N) of positions in degrees."""
    ra, dec = np.radians(ra), np.radians(dec)
    return np.array([np.cos(dec) * np.cos(ra), np.cos(dec) * np.sin(ra), np.sin(dec)])


def angular_distance(ra, dec, ra0, dec0):
    """Great-circle distance (degrees) of positions from (ra0, dec0), all in degrees."""
    # Vincenty's formula: accurate at all distances, unlike arccos for tiny ones.
    ra, dec = np.radians(ra), np.radians(dec)
    ra0, dec0 = math.radians(ra0), math.radians(dec0)
    dra = ra - ra0
    num = np.hypot(np.cos(dec) * np.sin(dra),
                   math.cos(dec0) * np.sin(dec) - math.sin(dec0) * np.cos(dec) * np.cos(dra))
    den = math.sin(dec0) * np.sin(dec) + math.cos(dec0) * np.cos(dec) * np.cos(dra)
    return np.degrees(np.arctan2(num, den))


def wrap_180(angle):
    """Wrap an angle, e.g. an RA difference, into (-180, 180] degrees."""
    return 180.0 - (180.0 - angle) % 360.0


def mean_direction(ra, dec):
    """Mean direction (RA, Dec in degrees) of positions in degrees.

    The mean of the unit vectors: well defined across RA 0/360 and near the poles.
    """
    vector = unit_vectors(ra, dec).mean(axis=1)
    return (math.degrees(math.atan2(vector[1], vector[0])) % 360.0,
            math.degrees(math.atan2(vector[2], math.hypot(vector[0], vector[1]))))


# --- Tangent plane ---------------------------------------------------------------------------

def project(ra, dec, ra0, dec0):
    """Gnomonic projection about the tangent point (ra0, dec0).

    Parameters
    ----------
    ra, dec : array_like
        Positions (deg).
    ra0, dec0 : float
        Tangent point (deg).

    Returns
    -------
    xi, eta : ndarray
        Standard coordinates (deg); NaN for points 90 deg or more from the tangent point.
    """
    ra, dec = np.radians(ra), np.radians(dec)
    ra0, dec0 = math.radians(ra0), math.radians(dec0)
    dra = ra - ra0
    cos_c = np.sin(dec0) * np.sin(dec) + np.cos(dec0) * np.cos(dec) * np.cos(dra)
    cos_c = np.where(cos_c > 0, cos_c, np.nan)
    xi = np.cos(dec) * np.sin(dra) / cos_c
    eta = (np.cos(dec0) * np.sin(dec) - np.sin(dec0) * np.cos(dec) * np.cos(dra)) / cos_c
    return np.degrees(xi), np.degrees(eta)


def deproject(xi, eta, ra0, dec0):
    """Inverse of :func:`project`: standard coordinates (deg) -> RA in [0, 360), Dec (deg)."""
    xi, eta = np.radians(xi), np.radians(eta)
    dec0 = math.radians(dec0)
    denominator = np.cos(dec0) - eta * np.sin(dec0)
    ra = ra0 + np.degrees(np.arctan2(xi, denominator))
    dec = np.degrees(np.arctan2(np.sin(dec0) + eta * np.cos(dec0), np.hypot(xi, denominator)))
    return np.mod(ra, 360.0), dec


# --- Circles on the sky -----------------------------------------------------------------------

def search_box(ra, dec, radius_deg):
    """RA intervals and Dec range of the box enclosing a circle on the sky.

    Parameters
    ----------
    ra, dec : float
        Centre, degrees.
    radius_deg : float
        Radius, degrees.

    Returns
    -------
    ra_ranges : list of (float, float)
        Non-wrapping RA intervals in [0, 360] degrees; ``[(0, 360)]`` when the
        circle reaches a pole.
    dec_range : (float, float)
        Dec limits, degrees.
    """
    dec_range = (max(dec - radius_deg, -90.0), min(dec + radius_deg, 90.0))
    if abs(dec) + radius_deg >= 90.0:
        return [(0.0, 360.0)], dec_range
    # Exact RA half-width of a spherical cap: asin(sin r / cos dec). It exceeds the
    # small-angle radius/cos(dec), which misses stars close to the pole.
    half = math.degrees(math.asin(min(1.0, math.sin(math.radians(radius_deg))
                                      / math.cos(math.radians(dec)))))
    if half >= 180.0:
        return [(0.0, 360.0)], dec_range
    lo, hi = (ra - half) % 360.0, (ra + half) % 360.0
    if lo <= hi:
        return [(lo, hi)], dec_range
    return [(lo, 360.0), (0.0, hi)], dec_range


def _in_ra_ranges(ra, ra_ranges):
    ra = np.asarray(ra) % 360.0
    inside = np.zeros(ra.shape, dtype=bool)
    for lo, hi in ra_ranges:
        inside |= (ra >= lo) & (ra <= hi)
    return inside


def select_circle(ra, dec, ra0, dec0, radius_deg):
    """Mask of positions within ``radius_deg`` great-circle distance of (ra0, dec0).

    A cheap RA/Dec box cut comes first so the trigonometry runs on few rows.
    All arguments in degrees.
    """
    ra, dec = np.asarray(ra, dtype=float), np.asarray(dec, dtype=float)
    ra_ranges, (dec_lo, dec_hi) = search_box(ra0, dec0, radius_deg)
    mask = (dec >= dec_lo) & (dec <= dec_hi) & _in_ra_ranges(ra, ra_ranges)
    candidates = np.flatnonzero(mask)
    far = angular_distance(ra[candidates], dec[candidates], ra0, dec0) > radius_deg
    mask[candidates[far]] = False
    return mask


# --- Matching ---------------------------------------------------------------------------------

def match_nearest(points, ref_tree, radius):
    """One-to-one nearest-neighbour pairs within ``radius`` (in the tree's units).

    The kd-tree step behind :func:`match_radec`; callers that match several times
    against the same reference stars (e.g. on a tangent plane) build the tree once.

    Parameters
    ----------
    points : sequence of ndarray
        The source coordinates, one array per axis.
    ref_tree : scipy.spatial.cKDTree
        The reference positions.
    radius : float
        Largest distance of a pair.

    Returns
    -------
    src_index, ref_index : ndarray of int
        Pairs sorted by source; a reference point claimed by several sources goes to
        the nearest one.
    """
    distance, ref_index = ref_tree.query(np.column_stack(points), distance_upper_bound=radius)
    src_index = np.flatnonzero(np.isfinite(distance))
    ref_index, distance = ref_index[src_index], distance[src_index]
    # Where several sources claim one reference star, only the closest keeps it.
    order = np.lexsort((distance, ref_index))
    first = np.ones(len(order), bool)
    first[1:] = ref_index[order][1:] != ref_index[order][:-1]
    chosen = np.sort(order[first])
    return src_index[chosen], ref_index[chosen]


def match_radec(ra, dec, ref_ra, ref_dec, radius_arcsec):
    """One-to-one nearest-neighbour pairs within a true angular distance.

    Parameters
    ----------
    ra, dec, ref_ra, ref_dec : array_like
        Source and reference positions (deg).
    radius_arcsec : float
        Largest separation (arcsec).

    Returns
    -------
    src_index, ref_index : ndarray of int
        Pairs sorted by source; a reference star claimed by several sources goes to
        the nearest one.
    """
    if len(ra) == 0 or len(ref_ra) == 0:
        return np.empty(0, int), np.empty(0, int)
    from scipy.spatial import cKDTree  # scipy.spatial adds 0.4 s to a start-up without matching
    tree = cKDTree(unit_vectors(ref_ra, ref_dec).T)
    # Unit vectors at angle theta are a chord 2 sin(theta / 2) apart.
    chord = 2.0 * math.sin(math.radians(radius_arcsec / 3600.0) / 2.0)
    return match_nearest(unit_vectors(ra, dec), tree, chord)
