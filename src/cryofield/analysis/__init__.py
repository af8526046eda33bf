"""cryofield.analysis."""
