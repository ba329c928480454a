"""The foundation and the house rules: layers, docs, Redis keys, config files, identifiers, top-k."""
