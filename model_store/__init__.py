"""Versioned ranker models: training, the on-disk store and validation."""
