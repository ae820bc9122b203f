"""The diagnose report's filters section."""
