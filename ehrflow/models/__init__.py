"""Torch modules only, each sized from a config.

``ehrflow.models.fusion``: ``FusionModel`` (EMERGE and MEDFuse variants) and ``FusionModelConfig``.
``ehrflow.models.medrec``: ``NLAMMR``, ``GAMENet``, ``MultiHotMLP``/``MultiHotLinear`` and ``medrec_loss``.
Import the submodule you need; this package imports nothing itself, so one model's import cost or
failure never reaches another.
"""
