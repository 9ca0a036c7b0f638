from d2ssod.methods import METHOD_REGISTRY
from d2ssod.methods.unbiased_teacher import UnbiasedTeacher


def test_unbiased_teacher_learns_objectness_and_classification_only():
    assert METHOD_REGISTRY.get("unbiased_teacher") is UnbiasedTeacher
    w = UnbiasedTeacher.loss_weights
    assert w["loss_rpn_cls"] == 1.0 and w["loss_cls"] == 1.0
    assert w["loss_rpn_loc"] == 0.0 and w["loss_box_reg"] == 0.0
