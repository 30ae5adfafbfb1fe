"""unionfs.core: union semantics in plain synchronous Python (no pyfuse3, no trio)."""
