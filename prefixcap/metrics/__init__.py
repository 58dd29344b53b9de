"""Caption quality metrics."""
