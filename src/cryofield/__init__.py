"""cryofield: neural ab initio heterogeneous cryo-EM reconstruction."""

__version__ = "0.1.0"
