"""The diagnose report's certification section."""
