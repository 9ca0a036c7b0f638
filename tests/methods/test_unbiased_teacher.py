import torch

from d2ssod.methods import METHOD_REGISTRY
from d2ssod.methods.unbiased_teacher import UnbiasedTeacher


def test_unbiased_teacher_learns_objectness_and_classification_only():
    assert METHOD_REGISTRY.get("unbiased_teacher") is UnbiasedTeacher
    w = UnbiasedTeacher.loss_weights
    assert w["loss_rpn_cls"] == 1.0 and w["loss_cls"] == 1.0
    assert w["loss_rpn_loc"] == 0.0 and w["loss_box_reg"] == 0.0


def test_unbiased_teacher_weights_every_term_but_box_regression_on_both_detectors():
    from d2ssod.config import get_ssod_cfg

    cfg = get_ssod_cfg()
    cfg.SSOD.UNSUP_WEIGHT = 4.0
    method = UnbiasedTeacher(cfg, None, None)
    rcnn = {"loss_rpn_cls": 1.0, "loss_rpn_loc": 2.0, "loss_cls": 3.0, "loss_box_reg": 5.0}
    weighted = method.weight_losses({k: torch.tensor(v) for k, v in rcnn.items()})
    # order of the sum unchanged: loss_weights' order
    assert list(weighted) == ["unsup/loss_rpn_cls", "unsup/loss_cls", "unsup/loss_rpn_loc",
                              "unsup/loss_box_reg"]
    assert {k: v.item() for k, v in weighted.items()} == {
        "unsup/loss_rpn_cls": 4.0, "unsup/loss_cls": 12.0, "unsup/loss_rpn_loc": 0.0,
        "unsup/loss_box_reg": 0.0}
    dense = {"loss_cls": 1.0, "loss_box_reg": 2.0, "loss_obj": 3.0}
    weighted = method.weight_losses({k: torch.tensor(v) for k, v in dense.items()})
    assert {k: v.item() for k, v in weighted.items()} == {
        "unsup/loss_cls": 4.0, "unsup/loss_box_reg": 0.0, "unsup/loss_obj": 12.0}


def test_unsup_term_weights_replace_the_methods_own_and_unknown_names_are_an_error():
    import pytest

    from d2ssod.config import get_ssod_cfg

    cfg = get_ssod_cfg()
    cfg.SSOD.UNSUP_WEIGHT = 2.0
    cfg.SSOD.UNSUP_TERM_WEIGHTS = (("loss_box_reg", 0.5), ("loss_cls", 0.0))
    method = UnbiasedTeacher(cfg, None, None)
    rcnn = {"loss_rpn_cls": 1.0, "loss_rpn_loc": 2.0, "loss_cls": 3.0, "loss_box_reg": 5.0}
    weighted = method.weight_losses({k: torch.tensor(v) for k, v in rcnn.items()})
    # λ_u 2 × (1, 0 (replaced), 0 (UT's own), 0.5 (replaced)) × the terms
    assert {k: v.item() for k, v in weighted.items()} == {
        "unsup/loss_rpn_cls": 2.0, "unsup/loss_cls": 0.0, "unsup/loss_rpn_loc": 0.0,
        "unsup/loss_box_reg": 5.0}
    cfg.SSOD.UNSUP_TERM_WEIGHTS = (("loss_bbox", 1.0),)
    with pytest.raises(ValueError, match=r"UNSUP_TERM_WEIGHTS names \['loss_bbox'\].*loss_box_reg"):
        UnbiasedTeacher(cfg, None, None).weight_losses(
            {k: torch.tensor(v) for k, v in rcnn.items()})
    cfg.SSOD.UNSUP_TERM_WEIGHTS = (("loss_cls", -1.0),)
    with pytest.raises(ValueError, match="UNSUP_TERM_WEIGHTS item"):
        UnbiasedTeacher(cfg, None, None)
