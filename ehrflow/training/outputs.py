"""Keys of the predictions dict the predictors return; the workflow's job results read them (no heavy imports)."""

MEDICATION_PREFIX = "medication:"
"""``MEDICATION_PREFIX + <drug>``: one recommended drug and its probability."""
MEDICATIONS_RECOMMENDED = "medications_recommended"
"""How many drugs were recommended; present whenever the medication model scored the patient."""

__all__ = ["MEDICATIONS_RECOMMENDED", "MEDICATION_PREFIX"]
