"""Models: the store, off-policy estimators and evaluation, promotion."""
