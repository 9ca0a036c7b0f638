"""Using a trained checkpoint, outside training: batched prediction over images or a dataset
(:mod:`.predictor`), the method's teacher rebuilt offline for pseudo-label export and pictures
(:mod:`.offline_teacher`), and export of the teacher for deployment (:mod:`.export`)."""
