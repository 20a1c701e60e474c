"""Bad-pixel region files (ds9) of the simulated camera, one folder per focal plane."""
