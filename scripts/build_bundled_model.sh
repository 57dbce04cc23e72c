#!/usr/bin/env bash
# Rebuild the bundled HER2ST model from the public data: import the sections that have images,
# pretrain the spot and region encoders on the tissue of B4, C2 and C3 (self-supervised, no
# labels), train on them (validation on spatial blocks of those sections chooses the epoch,
# then the recipe's refit trains every spot up to it), test on C4 (never seen), and package
# fp16 weights into src/hifusion_model/weights/. Measured on the 2-core CPU: spot pretraining
# 1908 s, region pretraining 1750 s, the validated run 36 min, the refit 2381 s (BENCHMARKS.md).
#   bash scripts/build_bundled_model.sh [HER2ST_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
D=${1:-../shared/data/her2st}
W=runs/bundled
mkdir -p runs/her2st "$W"
for s in B4 C2 C3 C4; do
  [ -f runs/her2st/$s.h5ad ] || .venv/bin/hifusion import her2st --image "$D/images/$s.jpg" \
    --counts "$D/counts/$s.tsv.gz" --spots "$D/spots/${s}_selection.tsv" --out runs/her2st/$s.h5ad
done
TRAIN="runs/her2st/B4.h5ad runs/her2st/C2.h5ad runs/her2st/C3.h5ad"
[ -f $W/spot_encoder.pt ] || .venv/bin/hifusion pretrain $TRAIN --steps 600 --bf16 \
  --out $W/spot_encoder.pt
[ -f $W/region_encoder.pt ] || .venv/bin/hifusion pretrain $TRAIN --encoder region --steps 800 \
  --bf16 --out $W/region_encoder.pt
.venv/bin/hifusion train $TRAIN --out $W/her2st_hifusion.pt --bf16 --workers 1 \
  --spot-encoder-init $W/spot_encoder.pt --region-encoder-init $W/region_encoder.pt
.venv/bin/hifusion predict runs/her2st/C4.h5ad --model $W/her2st_hifusion.pt --out $W/C4.pred.h5ad
.venv/bin/hifusion evaluate $W/C4.pred.h5ad --json > $W/C4.eval.json
.venv/bin/python scripts/package_bundled_model.py $W/her2st_hifusion.pt \
  --test $W/C4.eval.json --test-section C4
.venv/bin/hifusion info
