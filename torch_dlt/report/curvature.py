"""The diagnose report's curvature section."""
