"""Numba kernels. Importing the package adjusts how Numba loads cached code (numba_load): its
runtime module from an object-code cache, kernels' linking bitcode parsed only when needed."""
from . import numba_load

numba_load.install()
