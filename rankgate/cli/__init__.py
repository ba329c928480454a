"""The `rankgate` command line: the root group in main.py, one module per command
group in commands/, loaded only when its group is invoked (main.LazyGroup)."""
