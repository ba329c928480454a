"""After the answer: audit records, sampled explanations, drift and metrics."""
