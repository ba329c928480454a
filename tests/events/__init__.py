"""Events in, the consumer, streaming features and outcomes joined to decisions."""
