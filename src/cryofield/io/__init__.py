"""cryofield.io."""
