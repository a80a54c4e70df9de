"""Numba kernels. Importing the package routes Numba's runtime-module compilation through an
on-disk cache (nrt_cache): warm starts run no LLVM optimiser at all."""
from . import nrt_cache

nrt_cache.install()
