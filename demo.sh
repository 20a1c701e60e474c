#!/bin/sh
# The demo night: three raw biases, darks and dome flats of the simulated pODI
# camera, turned into masters one type at a time (raw frames are removed once their
# master exists, keeping the disk use low; the flats' pupil ghost is fitted, written
# as a template and divided out of the master flat), then one full 13-OTA object
# exposure with the pupil ghost at another rotator angle, reduced by
# podi_collectcells with the ghost removed and the astrometric and photometric
# calibration against the simulator's reference catalog of the field.
set -eu
PY=${PY:-python3}
DEMO=${DEMO:-demo}
BIN=$(dirname "$PY")
rm -rf "$DEMO"
mkdir -p "$DEMO/raw" "$DEMO/cals"
"$BIN/podi_simulate" "$DEMO/raw" --obstype OBJECT --seed 7 --mjd 56620.30 \
    --pupilghost 1 --rotator 20 --write-nonlinearity "$DEMO/cals/nonlinearity"
for step in "BIAS 100 0 56620.00" "DARK 200 300 56620.01" "DFLAT 300 20 56620.02"; do
    set -- $step
    "$BIN/podi_simulate" "$DEMO/rawcal" --obstype "$1" --count 3 --seed "$2" --exptime "$3" --mjd "$4" \
        --pupilghost 1
    "$BIN/podi_makecalibrations" "$DEMO"/rawcal/o*.? "$DEMO/cals" -nonlinearity="$DEMO/cals/nonlinearity" \
        -pupilghost
    rm -rf "$DEMO/rawcal"
done
EXPOSURE=$(ls -d "$DEMO"/raw/o*.1)
"$BIN/podi_collectcells" "$EXPOSURE" "$DEMO/reduced/%OBSID.fits" -cals="$DEMO/cals" \
    -nonlinearity -bpm=auto -pupilghost -photcalib -refcat="$EXPOSURE.refcat.fits"
