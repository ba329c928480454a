"""`rankgate bench`: the runner (run.py), the systems it starts and drives (systems.py),
the report (report.py), wrk (wrk.py) and the memory of the stack (memory.py)."""
