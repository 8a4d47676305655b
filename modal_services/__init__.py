"""Everything that runs in a worker, in subpackages by kind (engines, jobs, state, net, base_models,
library, safety), with the worker's job table (`services`) and the Modal app (`app`) beside them.

Importing this package and its light modules (errors, layout, jobs, state, services) never imports
torch; the engines import it inside `load()`.
"""

# The toolbox's version, written into every result's generation data (pyproject.toml reads it from here).
__version__ = "0.1.0"
