"""The engines: one package or module per model family, each a plain class with `load()` and typed job methods."""
