"""Detection transfer (PS-KD paper §4.3): Faster R-CNN on PASCAL VOC with a selfkd backbone.

* :mod:`selfkd.detect.backbone` — a run's ResNet (its checkpoint read with ``weights_only``) as
  a torchvision Faster R-CNN backbone (FPN, frozen BatchNorm);
* :mod:`selfkd.detect.voc` — VOC 2007/2012 through ``torchvision.datasets.VOCDetection``, with
  the layout checked first;
* :mod:`selfkd.detect.evaluate` — mAP at IoU 0.5 with torchmetrics' MeanAveragePrecision;
* :mod:`selfkd.detect.train` — the fine-tuning run (``selfkd detect RUN --voc ROOT``).

Needs the ``detect`` extra (torchmetrics and pycocotools): ``pip install 'selfkd[detect]'``.
"""
