"""The cache's background pipelines: prefetch (L3 -> L2) and backup (L2 -> L3)."""
