"""The audit verb on the embedded demo: the real job, then the report; the BadNets target must stand out."""

from __future__ import annotations

import json

import pyarrow.parquet as pq

from pipeline.cli import main
from pipeline.demo import build_demo_shards
from pipeline.sources import in_sample

CHEAP = ["purify.method=sdedit", "purify.params={t_start: 250, steps: 4}", "resources.purify_batch_size=40"]


def test_audit_flags_the_backdoor_target_and_exits_nonzero_on_threshold(ray_local, tmp_path, capsys):
    """Run the way the scheduled cluster audit runs: thresholds, `previous` and `publish_latest` naming the same
    file (absent on the first run: no trend), a fresh output folder per run."""
    build_demo_shards(tmp_path / "demo", n=120, attack="badnets", n_shards=2)
    latest = tmp_path / "audits" / "latest" / "report.json"

    def run(n: int, thresholds: dict, *sample: str) -> int:
        return main(["audit", "--config", "jobs/configs/audit.yaml", "--report", str(tmp_path / f"report{n}"),
                     "--thresholds", json.dumps(thresholds), *sample, f"source.uri={tmp_path / 'demo' / 'shards'}",
                     f"output.uri={tmp_path / 'audits' / f'run{n}'}", f"audit.previous={latest}",
                     f"audit.publish_latest={latest}", *CHEAP])

    def audited(n: int) -> list[str]:
        return sorted(pq.read_table(tmp_path / "audits" / f"run{n}", columns=["key"])["key"].to_pylist())

    # A lenient threshold first: no alert, exit 0, no trend yet (nothing published before), published.
    code = run(1, {"max_class_replaced_rate": 0.99})
    first = json.loads((tmp_path / "report1" / "report.json").read_text())
    # The shipped config asks for 500 rows; the source has 120: all of them.
    assert first["rows"] == 120 and first["errors"] == 0 and first["sample"]["fraction"] == 1.0
    # Half the images carry the trigger: the victim calls them class 0, purification sends them home.
    assert first["most_replaced"][0]["class"] == 0
    assert first["per_class"]["0"]["replaced_rate"] > 0.5
    assert code == 0 and not first["alerts"] and first["trend"] is None
    assert json.loads(latest.read_text())["generated_at"] == first["generated_at"]

    # Half the data against a strict threshold: an alert, exit 3, the trend against the published report; and the
    # alerting run does not replace the baseline (a lasting jump must not become the new normal after one alert).
    code = run(2, {"max_class_replaced_rate": 0.3}, "--sample", "60")
    report = json.loads((tmp_path / "report2" / "report.json").read_text())
    want = sorted(k for k in audited(1) if in_sample(k, 0.5, seed=0))
    assert audited(2) == want and report["rows"] == len(want)
    assert report["sample"] == {"rows_asked": 60, "source_rows": 120, "fraction": 0.5, "seed": 0, "limit": None}
    assert code == 3 and report["alerts"] and "ALERT" in capsys.readouterr().out
    assert report["trend"]["previous_generated_at"] == first["generated_at"]
    assert report["trend"]["flip_rate_delta"] == report["flip_rate"] - first["flip_rate"]
    html = (tmp_path / "report2" / "report.html").read_text()
    assert "data:image/png;base64," in html
    assert "sample: about 60 of 120 source rows: rows whose key hashes below 0.5 (seed 0)" in html
    assert json.loads(latest.read_text())["generated_at"] == first["generated_at"]

    # Lenient again: compared with the last run that raised nothing, then published.
    code = run(3, {"max_class_replaced_rate": 0.99}, "--sample", "60")
    again = json.loads((tmp_path / "report3" / "report.json").read_text())
    assert audited(3) == audited(2), "every run audits the same rows"
    assert code == 0 and not again["alerts"]
    assert again["trend"]["previous_generated_at"] == first["generated_at"]
    assert json.loads(latest.read_text())["generated_at"] == again["generated_at"]

    # A sample that draws no row (about 1 in 120 here, with a seed under which no key hashes that low): the job
    # writes nothing, the audit still reports, and an audit that saw nothing does not pass.
    seed = next(s for s in range(1000) if not any(in_sample(k, 1 / 120, s) for k in audited(1)))
    code = run(4, {"max_class_replaced_rate": 0.99, "min_rows": 1}, "--sample", "1", f"source.sample_seed={seed}")
    empty = json.loads((tmp_path / "report4" / "report.json").read_text())
    assert code == 3 and empty["rows"] == 0 and empty["alerts"] == [
        "nothing was measured: no valid row (0 rows, 0 of them errors)"], empty["alerts"]
    assert json.loads(latest.read_text())["generated_at"] == again["generated_at"], "not the new baseline"

    # The black box's budget runs out part-way: the rows it did not answer are retryable error rows. The audit says
    # so (exit 75, the report's count) and its rates, measured on what happened to be answered, do not become the
    # baseline.
    capsys.readouterr()
    code = run(5, {"max_class_replaced_rate": 0.99}, "--sample", "60", "blackbox.query_budget=101")
    partial = json.loads((tmp_path / "report5" / "report.json").read_text())
    assert code == 75, capsys.readouterr().out
    assert 0 < partial["retryable_errors"] == partial["errors"] < partial["rows"] and not partial["alerts"]
    assert "run the audit again" in capsys.readouterr().out
    assert json.loads(latest.read_text())["generated_at"] == again["generated_at"], "not the new baseline"
    # An alert says more than a partial sample: it wins.
    assert run(6, {"max_error_rate": 0.1}, "--sample", "60", "blackbox.query_budget=101") == 3
