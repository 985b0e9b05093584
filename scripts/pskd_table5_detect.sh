#!/usr/bin/env bash
# PS-KD paper table 5: Faster R-CNN on PASCAL VOC (2007+2012 trainval -> 2007 test) with the six
# ImageNet ResNet-152 backbones of table 4 (configs/paper/pskd/table4_imagenet*.yaml), 10 epochs,
# batch 1, lr 1e-3 x0.1 after epoch 5. VOC_ROOT must hold VOCdevkit/VOC2007 and VOCdevkit/VOC2012.
# Results: <run>/detect/final.json (map50, in %). Usage: VOC_ROOT=data/voc bash scripts/pskd_table5_detect.sh
set -euo pipefail
voc="${VOC_ROOT:-data/voc}"
runs="${RUNS:-runs/paper/pskd-imagenet}"
for run in ce label_smoothing cskd tfkd_self pskd pskd-cutmix; do
  dir="${runs}/imagenet-tv-resnet152-${run}-s0"
  if [[ -f "${dir}/detect/final.json" ]]; then echo "done: ${dir}"; continue; fi
  selfkd detect "${dir}" --voc "${voc}"
done
