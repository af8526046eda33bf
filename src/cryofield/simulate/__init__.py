"""cryofield.simulate: synthetic particle datasets with exact ground truth.

- :mod:`~cryofield.simulate.volumes`: built-in test objects, atomic-model density;
- :mod:`~cryofield.simulate.projection`: oversampled Fourier-slice image formation;
- :mod:`~cryofield.simulate.config`: :class:`SimulationConfig` and the demo presets;
- :mod:`~cryofield.simulate.dataset`: :func:`simulate_dataset` (stack, star, cs, truth).
"""
