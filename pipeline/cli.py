"""Command line: `python -m pipeline VERB [--config FILE] [section.key=value ...]` (console script `bbpurify`).

Thin by design: parse, load the one config, call the job.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path

from pipeline.config import load_config


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="job YAML (see jobs/configs/); defaults are the embedded demo")
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. purify.method=sdedit")


# sysexits' EX_TEMPFAIL: the job ran, but rows failed for a passing reason (the black box down or slow, its budget
# spent, a refused token) and the output is not complete; the same command retries them (a RayJob's backoffLimit).
EXIT_RETRYABLE = 75
# The job ran, but what it found says not to trust it as it stands: an audit's alerts, or a black box that answers
# the purification itself (pipeline/flows.py). It wins over EXIT_RETRYABLE: retrying rows would not change it.
EXIT_ALERT = 3


def cmd_sanitize(args: argparse.Namespace) -> int:
    from pipeline.job import run_sanitize

    cfg = load_config(args.config, args.overrides)
    summary = run_sanitize(cfg)
    print(summary.line())
    return EXIT_ALERT if summary.sinks else EXIT_RETRYABLE if summary.retryable else 0


def cmd_demo(args: argparse.Namespace) -> int:
    from pipeline.demo import build_demo_shards, format_table, score_output
    from pipeline.job import run_sanitize

    root = Path(args.out)
    manifest = build_demo_shards(root, n=args.n, attack=args.attack)
    out_dir = root / "sanitized"
    if out_dir.exists():
        shutil.rmtree(out_dir)  # the demo always starts from scratch; resume is for real jobs
    overrides = [f"source.uri={root / 'shards'}", f"output.uri={out_dir}",
                 f"blackbox.uri=onnx:models/victims/{args.attack}.onnx", *args.overrides]
    cfg = load_config(args.config, overrides)
    summary = run_sanitize(cfg)
    rows = score_output(str(out_dir), manifest)
    print()
    print(f"Embedded demo: {args.n} Fashion-MNIST test images, half with a {args.attack} trigger (target 0), "
          f"method {cfg.purify.method} {json.dumps(cfg.purify.params)}")
    print(format_table(rows))
    print(summary.line())
    print(f"Parquet output: {out_dir.resolve()}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from pipeline.evaluate import evaluate_config

    cfg = load_config(args.config, args.overrides)
    table = evaluate_config(cfg, attacks=args.attacks.split(","), n=args.n)
    print(table)
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    from pipeline.audit.run import run_audit

    cfg = load_config(args.config, args.overrides)
    try:
        thresholds = json.loads(args.thresholds) if args.thresholds else None
    except json.JSONDecodeError as e:
        raise ValueError(f"--thresholds is not valid JSON ({e}); e.g. '{{\"max_class_replaced_rate\": 0.3}}'") from None
    outcome = run_audit(cfg, args.report, previous=args.previous,
                        sample=args.sample, thresholds=thresholds, overwrite=args.overwrite)
    # An alert says more than a partial sample: it wins.
    return EXIT_ALERT if outcome.alerts else EXIT_RETRYABLE if outcome.retryable else 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    ap = argparse.ArgumentParser(prog="python -m pipeline", description="Black-box backdoor defense by diffusion "
                                 "purification: sanitize datasets, evaluate defenses, audit models.")
    sub = ap.add_subparsers(dest="verb", required=True)

    p = sub.add_parser("sanitize", help="the main job: purify + query every image of a source, write Parquet")
    _common(p)
    p.set_defaults(fn=cmd_sanitize)

    p = sub.add_parser("demo", help="embedded end to end: poisoned Fashion-MNIST shards -> sanitize -> CA/PA/ASR")
    p.add_argument("--n", type=int, default=1000, help="images (half triggered)")
    p.add_argument("--attack", default="badnets")
    p.add_argument("--out", default="out/demo")
    _common(p)
    p.set_defaults(fn=cmd_demo)

    p = sub.add_parser("eval", help="attacks x the configured defense, in process: CA/PA/ASR per attack")
    p.add_argument("--attacks", default="badnets,blended,wanet,sig")
    p.add_argument("--n", type=int, default=500, help="test images per attack")
    _common(p)
    p.set_defaults(fn=cmd_eval)

    p = sub.add_parser("audit", help="audit a dataset/black box: flip rates, replaced classes, HTML + JSON report")
    p.add_argument("--report", help="local report folder (default out/audit-report)")
    p.add_argument("--previous", help="previous report.json for the trend")
    p.add_argument("--sample", type=int,
                   help="audit about N images: a hash sample of the whole source, the same rows while it is unchanged")
    p.add_argument("--thresholds", help='JSON, e.g. {"max_class_replaced_rate": 0.3}, in place of the config\'s '
                   'audit.thresholds (all of them: a key left out is not checked); crossing one exits 3')
    p.add_argument("--overwrite", action="store_true",
                   help="replace an output.uri / report folder that already holds data (refused otherwise)")
    _common(p)
    p.set_defaults(fn=cmd_audit)

    sub.add_parser("bench", help="every method x attack: efficacy and cost tables and plots (bench --help)")
    sub.add_parser("zoo", help="methods x a zoo of victims not tuned on: per victim and the worst (zoo --help)")

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # its own parser: flags like --n must not be read by this one
        from pipeline.bench import main as bench_main

        return bench_main(argv[1:])
    if argv[:1] == ["zoo"]:
        from pipeline.zoo import main as zoo_main

        return zoo_main(argv[1:])
    # Overrides may sit on both sides of an option (`a.b=1 --sample 60 c.d=2`): argparse takes the first run as the
    # positionals and leaves the second over; intermixed parsing does not work with subcommands.
    args, rest = ap.parse_known_args(argv)
    stray = [r for r in rest if r.startswith("-") or "=" not in r]
    if stray or (rest and not hasattr(args, "overrides")):
        ap.error(f"unrecognized arguments: {' '.join(stray or rest)}")
    if rest:
        args.overrides = [*args.overrides, *rest]
    try:
        return args.fn(args)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
