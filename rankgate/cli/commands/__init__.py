"""One module per command group of `rankgate` (rankgate/cli/main.py names them)."""
