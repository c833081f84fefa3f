"""Small helpers shared by the library: atomic file writes, free ports."""
