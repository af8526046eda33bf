"""cryofield.inference."""
