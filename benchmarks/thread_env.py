"""Thread counts for benchmark processes, set in the environment before numpy, torch or ITK load:
each reads its variable once, when its thread pool starts, and ignores later changes."""

import os

THREAD_VARIABLES = ("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "OMP_NUM_THREADS",
                    "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def limit_threads(n: int) -> None:
    """``n`` threads for ITK (antspyx), OpenMP (torch), OpenBLAS and MKL in this process and the
    processes it starts."""
    os.environ.update({name: str(int(n)) for name in THREAD_VARIABLES})
