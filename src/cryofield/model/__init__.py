"""cryofield.model."""
