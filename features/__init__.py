"""The Feast feature repository of rankgate and the one feature-vector builder."""
