"""Image-level selection of reliable pseudo-labels (ST++): how stable a model's predictions on
an image are across training checkpoints, and the split into the most stable images and the
rest. Task-agnostic: an agreement function compares two predictions of one image (detections
or segmentation maps)."""
