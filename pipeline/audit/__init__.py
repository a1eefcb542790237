"""Audit report over the pipeline's Parquet output: JSON for machines, one self-contained HTML page for people."""

from pipeline.audit.report import build_report, check_previous, evaluate_thresholds, load_output
from pipeline.audit.thresholds import THRESHOLD_KEYS, ThresholdError, Thresholds, parse_thresholds

__all__ = [
    "THRESHOLD_KEYS", "ThresholdError", "Thresholds", "build_report", "check_previous", "evaluate_thresholds",
    "load_output", "parse_thresholds",
]
