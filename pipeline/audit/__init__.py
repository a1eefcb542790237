"""Audit report over the pipeline's Parquet output: JSON for machines, one self-contained HTML page for people."""

from pipeline.audit.report import (
    THRESHOLD_KEYS,
    build_report,
    evaluate_thresholds,
    load_output,
)

__all__ = ["THRESHOLD_KEYS", "build_report", "evaluate_thresholds", "load_output"]
