"""Audit report over the pipeline's Parquet output: JSON for machines, one self-contained HTML page for people.

Names load on first use, so that reading a job config (which validates audit thresholds) imports no plotting."""

from __future__ import annotations

from importlib import import_module
from typing import Any

_WHERE = {"build_report": "report", "check_previous": "report", "evaluate_thresholds": "report",
          "load_output": "report", "THRESHOLD_KEYS": "thresholds", "ThresholdError": "thresholds",
          "Thresholds": "thresholds", "parse_thresholds": "thresholds"}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'pipeline.audit' has no attribute {name!r}")
    return getattr(import_module(f"pipeline.audit.{_WHERE[name]}"), name)
