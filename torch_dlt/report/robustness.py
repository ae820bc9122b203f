"""The diagnose report's robustness section."""
