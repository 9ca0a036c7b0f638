#!/usr/bin/env python
"""Convert VOC XML or YOLO txt labels to the COCO json that d2ssod's custom datasets read.

    python tools/convert_to_coco.py voc --xml-dir Annotations/ [--classes names.txt] \
        [--skip-difficult] --out labeled.json
    python tools/convert_to_coco.py yolo --labels labels/ --images images/ [--classes names.txt] \
        [--keep-images-without-labels] [--image-root DIR] --out labeled.json

YOLO class names: --classes, one name per line (line k = class k) or a YOLOv5 data.yaml (its
``names``); without --classes, LabelImg's classes.txt in the labels folder. Images without a
label file are left out and listed (usually unlabeled images in the same folder);
--keep-images-without-labels includes them as images without objects. Boxes past the image edge
are clipped, boxes of zero size left out; both are listed with their file and line.

The json's file names are the XMLs' <filename> (VOC) or the image paths relative to --images
(YOLO; to --image-root when given): point DATASETS.CUSTOM.IMAGE_ROOT (compare.py --image-root)
at that folder. Labeled and validation images in two folders: convert both with the same
--image-root, their common parent. Box
conventions and errors: d2ssod/data/converters.py.
"""
import argparse
import os

from d2ssod.data.converters import (
    ConversionError,
    read_class_names,
    voc_to_coco,
    write_json,
    yolo_to_coco,
)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="format", required=True)
    voc = sub.add_parser("voc", help="a folder of Pascal-VOC XML files")
    voc.add_argument("--xml-dir", required=True)
    voc.add_argument("--classes",
                     help="class names, one per line (default: the names found, sorted)")
    voc.add_argument("--skip-difficult", action="store_true", help="drop objects marked difficult")
    yolo = sub.add_parser("yolo", help="YOLO txt labels + class names + images")
    yolo.add_argument("--labels", required=True, help="folder of .txt label files")
    yolo.add_argument("--images", required=True, help="folder of the images (for their sizes)")
    yolo.add_argument("--classes", help="class names, one per line (line k = class k), or a "
                      "YOLOv5 data.yaml (default: classes.txt in the --labels folder)")
    yolo.add_argument("--image-root", help="write file names relative to this folder (compare.py's "
                      "--image-root, when labeled and validation images are in different folders "
                      "under it; default: --images)")
    yolo.add_argument("--keep-images-without-labels", action="store_true",
                      help="include images with no .txt as images without objects (default: "
                      "left out and listed)")
    for p in (voc, yolo):
        p.add_argument("--out", required=True, help="COCO json to write")
    args = parser.parse_args(argv)
    notes = []
    for flag, folder in (("--xml-dir", getattr(args, "xml_dir", None)),
                         ("--labels", getattr(args, "labels", None)),
                         ("--images", getattr(args, "images", None))):
        if folder is not None and not os.path.isdir(folder):
            raise SystemExit(f"error: {flag} {folder}: no such folder.")
    try:
        if args.format == "voc":
            names = read_class_names(args.classes) if args.classes else None
            coco = voc_to_coco(args.xml_dir, names, args.skip_difficult, notes=notes)
        else:
            coco = yolo_to_coco(args.labels, args.images, args.classes,
                                args.keep_images_without_labels, notes=notes,
                                image_root=args.image_root)
    except ConversionError as e:
        raise SystemExit(f"error: {e}")
    for note in notes:
        print(f"note: {note}")
    write_json(coco, args.out)
    print(f"wrote {args.out}: {len(coco['images'])} images, {len(coco['annotations'])} boxes, "
          f"{len(coco['categories'])} classes ({', '.join(c['name'] for c in coco['categories'])})")


if __name__ == "__main__":
    main()
