"""One BLAS thread per process: import before numpy.

Every OTA has its own worker process, so BLAS threads inside them only compete for
the same cores (and spin while they wait). The thread counts are read once, when
numpy first loads its BLAS library; a value set in the environment wins.
"""

import os

for _variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")
