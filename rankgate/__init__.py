"""rankgate: real-time, policy-compliant scoring for marketing personalization."""

__version__ = "0.1.0"
