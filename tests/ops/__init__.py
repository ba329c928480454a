"""Operator commands: the CLI, setup, projects, erasure, the benchmark and load tests."""
