"""Everything that runs in a worker: engines, state store, jobs, and the Modal app.

Importing this package (and its light modules: errors, state, jobs, layout,
services) never imports torch; the engines import it inside `load()`.
"""
