"""rankgate's test suite: it runs from the repository (a source checkout)."""

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
