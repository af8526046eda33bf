"""cryofield.physics."""
