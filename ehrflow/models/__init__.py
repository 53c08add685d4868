"""Model definitions: torch modules sized from a config, and boosted trees held as arrays.

``ehrflow.models.fusion``: ``FusionModel`` (EMERGE and MEDFuse variants) and ``FusionModelConfig``.
``ehrflow.models.medrec``: ``NLAMMR``, ``GAMENet``, ``MultiHotMLP``/``MultiHotLinear`` and ``medrec_loss``.
``ehrflow.models.trees``: ``TreeEnsemble``, gradient-boosted trees exported from scikit-learn (numpy only).
Import the submodule you need; this package imports nothing itself, so one model's import cost or
failure never reaches another.
"""
