"""`rankgate bench --soak DURATION`: realistic load for a long while, with faults,
counted to the last record (loadtests/soak/run.py; the report in soak.md)."""
