"""The ``torch-dlt diagnose`` report: theory next to measurement on the user's model, as HTML."""

from torch_dlt.report.diagnose import (
    DiagnoseContext,
    DiagnoseReport,
    diagnose,
    load_factory,
    register_section,
    section_names,
)

__all__ = [
    "DiagnoseContext",
    "DiagnoseReport",
    "diagnose",
    "load_factory",
    "register_section",
    "section_names",
]
