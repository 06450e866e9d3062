"""Content shipped with fts-mcp: sample datasets and the tiny demo model (read with importlib.resources)."""
