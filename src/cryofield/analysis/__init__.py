"""cryofield.analysis: what a reconstruction tells the user, and how good it is.

Modules: ``latent`` (PCA, UMAP, k-means, KDE), ``volumes`` (maps at latent points),
``junk`` (junk estimate), ``plots`` (figures), ``report`` (``analyze_run``: the HTML
report), ``metrics`` (pose errors with global alignment and mirror, ARI/NMI/accuracy,
FSC-AUC, Spearman), ``align`` (rigid map alignment) and ``evaluate`` (scores against
simulation truth). Submodules are imported on use (matplotlib and umap are heavy).
"""
