"""Offline self-training (ST / ST++): a supervised stage, pseudo-labels of the unlabeled
images (with test-time augmentation), image-level selection by stability, re-training.

:mod:`.config` declares the ``SELF_TRAIN`` keys (imported with ``d2ssod``), :mod:`.pipeline`
runs the stages (``tools/self_train.py``), :mod:`.tta` merges the labeller's test-time views.
The package imports nothing else here, so that declaring its keys does not load the trainer."""
