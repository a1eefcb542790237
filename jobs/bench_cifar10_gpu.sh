#!/usr/bin/env bash
# The GPU configuration for CIFAR-10-sized models: trains one backdoored victim per attack on CIFAR-10, then
# runs the whole method grid with the hub's google/ddpm-cifar10-32 DDPM in fp16. Needs a CUDA GPU and access to the
# Hugging Face hub (or CIFAR10_DIR holding the parquet files of uoft-cs/cifar10 and the model under models/).
#
#   bash jobs/bench_cifar10_gpu.sh            # OUT=out/cifar10 N=1000 by default
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/cifar10}
N=${N:-1000}
for attack in badnets blended wanet sig; do
  [ -f "$OUT/victims/$attack.onnx" ] || python jobs/train_victim.py --data cifar10 --attack "$attack" --width 64 \
    --epochs 30 --flip --device cuda --out "$OUT/victims/$attack.onnx"
done
python -m pipeline bench --data cifar10 --victims "$OUT/victims" --model ddpm-cifar10-32 --device cuda \
  --dtype float16 --n "$N" --batch-size 512 --out "$OUT/bench"
