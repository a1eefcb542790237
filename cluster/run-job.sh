#!/bin/sh
# The entrypoint of every Ray job on Kubernetes, run by the Ray driver on the head pod:
#   sh /home/ray/bbpurify/cluster/run-job.sh sanitize|audit [section.key=value ...]
# It runs `python -m pipeline VERB --config /configs/cluster.yaml` with the deployment's settings as overrides.
# The settings are the pod's environment, from the bbpurify-settings ConfigMap (cluster/kustomization.yaml):
#   BBPURIFY_DATA           s3://BUCKET/PREFIX holding shards/ (input), sanitized/ (output) and audits/
#   BBPURIFY_BLACKBOX_URI   the black box (unset: the config's blackbox.uri)
#   S3_ENDPOINT_URL         read by the pipeline itself (unset or empty: AWS S3)
# An audit writes under audits/RUN_ID/ (BBPURIFY_RUN_ID, else the UTC time), compares with audits/latest/report.json
# and, unless it raised an alert, publishes its own report there for the next run. Arguments after the verb come
# last, so they win.
set -eu
if [ $# -lt 1 ]; then
  echo "usage: run-job.sh sanitize|audit [section.key=value ...]" >&2
  exit 2
fi
verb="$1"
shift
data="${BBPURIFY_DATA:-s3://bbpurify-data/cifar10}"
data="${data%/}"
case "$data" in
  s3://?*) ;;
  *) echo "BBPURIFY_DATA must be s3://BUCKET[/PREFIX], got '$data'" >&2; exit 2 ;;
esac
if [ -n "${BBPURIFY_BLACKBOX_URI:-}" ]; then
  set -- "blackbox.uri=$BBPURIFY_BLACKBOX_URI" "$@"
fi
case "$verb" in
  sanitize)
    set -- "source.uri=$data/shards/" "output.uri=$data/sanitized/" "$@"
    ;;
  audit)
    run_id="${BBPURIFY_RUN_ID:-$(date -u +%Y%m%d-%H%M%S)}"
    # the local report folder too is the run's own: a long-lived head runs many audits
    set -- --report "out/audit-report/$run_id" "source.uri=$data/shards/" "output.uri=$data/audits/$run_id/" \
      "audit.previous=$data/audits/latest/report.json" "audit.publish_latest=$data/audits/latest/report.json" "$@"
    ;;
  *)
    echo "run-job.sh: unknown verb '$verb' (sanitize or audit)" >&2
    exit 2
    ;;
esac
exec python -m pipeline "$verb" --config "${BBPURIFY_CONFIG:-/configs/cluster.yaml}" "$@"
