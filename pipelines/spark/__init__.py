"""The Spark layer: ML stages, Arrow task functions, sources, progress, the one-liner `load()`."""
