"""cryofield.cli."""
