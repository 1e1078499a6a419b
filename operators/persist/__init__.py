"""Persistence: the embedded Tiled server, the Tiled writer, the run catalog and frame URIs."""
