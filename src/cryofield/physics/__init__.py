"""cryofield.physics: image-formation operators as pure tensor functions.

Modules: ``fourier`` (centred FFT / Hartley), ``lattice`` (frequency grids), ``ctf``,
``shift`` (phase ramps), ``rotation`` (matrices, quaternions, RELION Euler, axis-angle,
6-D), ``so3_grid`` (hierarchical HEALPix grid), ``slicing`` (central slices, reference
projector), ``backproject`` (direct Fourier inversion), ``fsc``, ``filters`` (Fourier
crop, low-pass, soft masks). Conventions: docs/dev/contracts.md.
"""
