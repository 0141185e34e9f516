#!/usr/bin/env bash
# The main job on the embedded default: synthetic bottles, a bundle trained on the
# CPU, a replay of an independent labelled set through the station, published
# over ZeroMQ on 127.0.0.1 while `station subscribe` prints one line per verdict.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${WORK:-runs/demo}
ENDPOINT=${ENDPOINT:-tcp://127.0.0.1:5556}
EPOCHS=${EPOCHS:-60}

python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[train]' 2> >(grep -v '^WARNING: Location' >&2)
S=.venv/bin/station
mkdir -p "$WORK"

echo "== 1/4 synthetic bottles: training set (seed 1) and an independent evaluation set (seed 2, with defects of no trained class)"
$S synth --out "$WORK/data" --seed 1 --train-good 60 --test-per-class 20
$S synth --out "$WORK/eval" --seed 2 --train-good 0 --test-per-class 30 --novel 30

echo "== 2/4 training classifier + autoencoder on the CPU ($EPOCHS epochs), exporting ONNX, calibrating"
start=$SECONDS
$S train --data "$WORK/data/bottle" --out models/demo --epochs "$EPOCHS" --seed 1 > "$WORK/train.json"
echo "training took $((SECONDS - start)) s"

echo "== 3/4 replaying $WORK/eval/bottle/test through the station, publishing on $ENDPOINT"
$S subscribe --connect "$ENDPOINT" --exit-on-stop &
SUB=$!
$S --log-level warning replay --model models/demo --source "$WORK/eval/bottle/test" --publish "$ENDPOINT" \
    --wait-subscribers 1 --out "$WORK/verdicts.jsonl" > "$WORK/summary.txt"
wait "$SUB"

echo "== 4/4 summary (also in $WORK/verdicts.metrics.json)"
cat "$WORK/summary.txt"
