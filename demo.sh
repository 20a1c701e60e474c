#!/bin/sh
# The demo night: raw calibration frames, one full pODI object exposure, masters,
# reduction. The raw calibration frames are removed once the masters exist.
set -eu
PY=${PY:-python3}
DEMO=${DEMO:-demo}
BIN=$(dirname "$PY")
rm -rf "$DEMO"
mkdir -p "$DEMO/raw" "$DEMO/rawcal" "$DEMO/cals"
"$BIN/podi_simulate" "$DEMO/rawcal" --obstype BIAS --count 3 --seed 100 --mjd 56620.00 \
    --write-nonlinearity "$DEMO/cals/nonlinearity"
"$BIN/podi_simulate" "$DEMO/rawcal" --obstype DARK --count 3 --seed 200 --exptime 300 --mjd 56620.01
"$BIN/podi_simulate" "$DEMO/rawcal" --obstype DFLAT --count 3 --seed 300 --exptime 20 --mjd 56620.02
"$BIN/podi_makecalibrations" "$DEMO"/rawcal/o*.? "$DEMO/cals" -nonlinearity="$DEMO/cals/nonlinearity"
rm -rf "$DEMO/rawcal"
"$BIN/podi_simulate" "$DEMO/raw" --obstype OBJECT --seed 7 --mjd 56620.30
"$BIN/podi_collectcells" "$DEMO"/raw/o*.1 "$DEMO/reduced/%OBSID.fits" -cals="$DEMO/cals" \
    -nonlinearity -bpm=auto
