"""The audit's alert thresholds: one pydantic model, so a typo or an out-of-range value is refused when the config
is read, before any image is purified, and the report states exactly what was checked."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

DEFAULT_MIN_CLASS_ROWS = 10


class ThresholdError(ValueError):
    """The thresholds name an unknown key or hold a value out of range."""


class Thresholds(BaseModel):
    """Every key is optional; an unset key checks nothing. Rates are shares in [0, 1]."""

    # Strict: YAML's `true` is not a rate of 1 (which would silently check nothing), nor a row count of 1.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    max_flip_rate: float | None = Field(
        default=None, strict=True, ge=0, le=1,
        description="alert when the overall flip rate (pred_orig != pred_purified) exceeds this")
    max_class_replaced_rate: float | None = Field(
        default=None, strict=True, ge=0, le=1,
        description="alert when any class's replaced rate exceeds this (classes with >= min_class_rows)")
    min_class_rows: int | None = Field(
        default=None, strict=True, ge=1,
        description=f"rows a class needs before max_class_replaced_rate applies (default {DEFAULT_MIN_CLASS_ROWS})")
    max_error_rate: float | None = Field(
        default=None, strict=True, ge=0, le=1, description="alert when the share of error rows exceeds this")
    # A rise can be at most 1 (0 -> 1); a negative limit would alert on every unchanged run.
    max_flip_rate_increase: float | None = Field(
        default=None, strict=True, ge=0, le=1,
        description="alert when the flip rate rose by more than this since the previous report")
    min_rows: int | None = Field(
        default=None, strict=True, ge=0,
        description="alert when the audit has fewer valid (non-error) rows than this (an empty audit proves nothing)")

    def as_dict(self) -> dict[str, float | int]:
        """Only the keys that were set: what the report shows as 'checked'."""
        return self.model_dump(exclude_none=True)


THRESHOLD_KEYS: dict[str, str] = {name: f.description or "" for name, f in Thresholds.model_fields.items()}


def parse_thresholds(value: Thresholds | Mapping[str, Any] | None) -> Thresholds:
    """A dict (from YAML, JSON or the CLI) -> Thresholds, or a ThresholdError that names every bad key."""
    if isinstance(value, Thresholds):
        return value
    if value is None:
        return Thresholds()
    if not isinstance(value, Mapping):
        raise ThresholdError(f"thresholds must be a mapping of {sorted(THRESHOLD_KEYS)}, got {type(value).__name__}")
    try:
        return Thresholds.model_validate(dict(value))
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'thresholds'}: {err['msg']}"
                             for err in e.errors())
        raise ThresholdError(f"invalid audit thresholds ({problems}); known keys: {sorted(THRESHOLD_KEYS)}") from None
