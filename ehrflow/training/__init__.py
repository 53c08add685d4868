"""Featurisation, Ray Train trainers, metrics and evaluation.

Heavy imports (torch, Ray) happen in the submodules: ``from ehrflow.training.fusion import train_fusion``.
"""
