"""PETWorkbenchLib: services shared by every PETWorkbench module.

Nothing here imports torch, monai or slicer at import time; each sub-module imports what it needs when it is used.
See docs/ARCHITECTURE.md for the contracts between this package and the module engines.
"""

__version__ = "0.1.0"
