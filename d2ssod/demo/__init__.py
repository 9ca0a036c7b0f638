"""The embedded demo data: a seeded generator of small images of five shape classes with their
boxes (:mod:`.render` draws one image, :mod:`.generator` writes the labeled, unlabeled and
validation sets to disk, once, safely from several processes). :mod:`d2ssod.data.builtin`
registers them as ``demo_labeled``, ``demo_unlabeled`` and ``demo_val``."""
