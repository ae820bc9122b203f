"""The ``torch-dlt diagnose`` report: theory next to measurement on the user's model, as HTML."""
