"""cryofield.simulate."""
