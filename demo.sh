#!/bin/sh
# The demo night: three raw biases, darks and dome flats of the simulated pODI
# camera, turned into masters one type at a time (raw frames are removed once their
# master exists, keeping the disk use low), then one full 13-OTA object exposure,
# reduced by podi_collectcells with the astrometric and photometric calibration
# against the simulator's reference catalog of the field.
set -eu
PY=${PY:-python3}
DEMO=${DEMO:-demo}
BIN=$(dirname "$PY")
rm -rf "$DEMO"
mkdir -p "$DEMO/raw" "$DEMO/cals"
"$BIN/podi_simulate" "$DEMO/raw" --obstype OBJECT --seed 7 --mjd 56620.30 \
    --write-nonlinearity "$DEMO/cals/nonlinearity"
for step in "BIAS 100 0 56620.00" "DARK 200 300 56620.01" "DFLAT 300 20 56620.02"; do
    set -- $step
    "$BIN/podi_simulate" "$DEMO/rawcal" --obstype "$1" --count 3 --seed "$2" --exptime "$3" --mjd "$4"
    "$BIN/podi_makecalibrations" "$DEMO"/rawcal/o*.? "$DEMO/cals" -nonlinearity="$DEMO/cals/nonlinearity"
    rm -rf "$DEMO/rawcal"
done
EXPOSURE=$(ls -d "$DEMO"/raw/o*.1)
"$BIN/podi_collectcells" "$EXPOSURE" "$DEMO/reduced/%OBSID.fits" -cals="$DEMO/cals" \
    -nonlinearity -bpm=auto -photcalib -refcat="$EXPOSURE.refcat.fits"
