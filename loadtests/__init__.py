"""Load tests (Locust) and the benchmark (`rankgate bench`)."""
