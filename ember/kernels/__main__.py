"""`python -m ember.kernels`: build the native kernels for this CPU now (make runs it after installing)."""

import sys

from ember.kernels.native import isa, library

lib = library()
print(f"ember kernels: isa={isa()} {'ready' if lib is not None else 'unavailable (torch fallback)'}")
sys.exit(0)
