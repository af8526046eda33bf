"""cryofield.io: particle stacks and metadata in, tables and stacks out.

``load_particle_table`` reads .star/.cs/.mrcs/.txt/.npz into a :class:`ParticleTable`;
:class:`ParticleSource` serves its images as float32 tensors.
"""

from cryofield.io.metadata import ParticleTable, load_particle_table
from cryofield.io.particles import ParticleSource

__all__ = ["ParticleSource", "ParticleTable", "load_particle_table"]
