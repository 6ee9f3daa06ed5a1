"""oms-pipeline: the order management core (README).

A module edited since it was compiled is imported from its source (compiled.py); the guard is
installed here, before any other module of the package (or of `stages`, which imports this
package first) is imported.
"""
from . import compiled as _compiled

_compiled.install()
