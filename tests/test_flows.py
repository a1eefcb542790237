"""The sink check: which flows of rows between classes make a class a sink, and which do not."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from pipeline.config import SinkCheckConfig, load_config
from pipeline.flows import find_sinks, sinks_in_table, wilson_lower

DEFAULTS = SinkCheckConfig().settings


def flows(rows_per_class: int = 100, classes: int = 10, moves: dict[tuple[int, int], int] | None = None):
    """`rows_per_class` rows answered c on the original for each class c, all kept, but `moves[(c, d)]` of them
    answered d after purification."""
    orig, purified = [], []
    for c in range(classes):
        out = [d for (src, d), k in (moves or {}).items() if src == c for _ in range(k)]
        orig += [c] * rows_per_class
        purified += out + [c] * (rows_per_class - len(out))
    return np.array(orig), np.array(purified)


def test_an_ordinary_backdoor_and_look_alike_classes_make_no_sink():
    # triggered rows leave the target for their own classes; shirts and coats read as pullovers after purification
    moves = {(0, d): 10 for d in range(1, 10)} | {(6, 2): 15, (4, 2): 12, (3, 2): 6}
    assert find_sinks(*flows(moves=moves), **DEFAULTS) == []


def test_a_class_absorbing_most_others_is_a_sink_naming_what_it_took():
    moves = {(c, 0): 30 for c in range(1, 10)} | {(6, 2): 15}
    [sink] = find_sinks(*flows(moves=moves), **DEFAULTS)
    assert sink.klass == 0 and sorted(sink.absorbed) == list(range(1, 10)) and sink.others == 9
    assert sink.absorbed[3] == (100, 30) and sink.rows_in == 270
    assert sink.describe().startswith("class 0 absorbs 9 of 9 other classes")
    assert sink.as_dict()["absorbed"]["3"] == {"rows": 100, "moved": 30}


def test_class_share_sets_how_many_classes_a_sink_takes():
    four = {(c, 0): 30 for c in range(1, 5)}
    five = {(c, 0): 30 for c in range(1, 6)}
    assert find_sinks(*flows(moves=four), **DEFAULTS) == []  # 4 of 9 < half
    assert [s.klass for s in find_sinks(*flows(moves=five), **DEFAULTS)] == [0]
    assert find_sinks(*flows(moves=four), **{**DEFAULTS, "class_share": 0.4})  # ceil(3.6) = 4
    # never fewer than three classes, whatever the share
    assert find_sinks(*flows(moves={(1, 0): 50, (2, 0): 50}), **{**DEFAULTS, "class_share": 0.1}) == []


def test_few_rows_are_not_evidence():
    # half of every class moves, but with 10 rows a class the rate's lower bound proves little, and classes
    # under min_class_rows are not judged at all
    moves = {(c, 0): 5 for c in range(1, 10)}
    assert find_sinks(*flows(rows_per_class=10, moves=moves), **DEFAULTS) == []
    assert find_sinks(*flows(rows_per_class=10, moves=moves), **{**DEFAULTS, "min_class_rows": 10})
    # a rate that is only just over absorb_rate on few rows does not count, on many it does
    assert wilson_lower(2, 40) < DEFAULTS["absorb_rate"] < wilson_lower(200, 4000)


def test_counted_flows_give_what_rows_give():
    orig, purified = flows(moves={(c, 0): 30 for c in range(1, 10)})
    pairs, counts = np.unique(np.stack([orig, purified], 1), axis=0, return_counts=True)
    assert (find_sinks(pairs[:, 0], pairs[:, 1], counts, **DEFAULTS)
            == find_sinks(orig, purified, **DEFAULTS))
    with pytest.raises(ValueError, match="one entry per flow"):
        find_sinks(orig, purified[:-1], **DEFAULTS)


def test_many_classes_without_a_square_matrix():
    rng = np.random.default_rng(0)
    orig = np.repeat(np.arange(20_000), 25)
    purified = np.where(rng.random(len(orig)) < 0.02, rng.integers(0, 20_000, len(orig)), orig)
    assert find_sinks(orig, purified, **DEFAULTS) == []
    purified[(orig % 2 == 1) & (np.arange(len(orig)) % 25 < 10)] = 8  # 10 of 25 rows of each odd class
    [sink] = find_sinks(orig, purified, **DEFAULTS)
    assert sink.klass == 8 and len(sink.absorbed) == 10_000


def test_the_output_table_check_leaves_error_rows_out():
    orig, purified = flows(moves={(c, 0): 30 for c in range(1, 10)})
    n = len(orig)
    table = pa.table({"pred_orig": pa.array(list(orig) + [None] * 50, pa.int64()),
                      "pred_purified": pa.array(list(purified) + [None] * 50, pa.int64()),
                      "error": pa.array([None] * n + ["black box: timed out"] * 50, pa.string())})
    [sink] = sinks_in_table(table, **DEFAULTS)
    assert sink.klass == 0 and sink.rows_in == 270
    assert sinks_in_table(table.drop_columns(["pred_orig"]), **DEFAULTS) == []


def test_the_check_is_configured_once_with_ranges():
    cfg = load_config(overrides=["sink_check.absorb_rate=0.05", "sink_check.enabled=false"])
    assert cfg.sink_check.absorb_rate == 0.05 and not cfg.sink_check.enabled
    for bad in ("sink_check.absorb_rate=0", "sink_check.class_share=1.5", "sink_check.min_class_rows=0",
                "sink_check.typo=1"):
        with pytest.raises(ValueError, match="sink_check"):
            load_config(overrides=[bad])
