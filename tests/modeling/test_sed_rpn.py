"""SEDRPN (d2ssod/modeling/sed_rpn.py): Detectron2's RPN with the same parameters and forward,
and helpers that give the same proposals."""
import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling.proposal_generator import RPN, build_proposal_generator
from detectron2.structures import ImageList

import d2ssod  # noqa: F401
from d2ssod.modeling.sed_rpn import SEDRPN
from sed_helpers import STRIDES, sed_cfg, toy_features


def test_sedrpn_has_rpn_parameters_and_forward_and_its_helpers_match():
    cfg = sed_cfg()
    shapes = {n: ShapeSpec(channels=64, stride=s) for n, s in STRIDES.items()}
    torch.manual_seed(4)
    sed = build_proposal_generator(cfg, shapes)
    cfg_rpn = sed_cfg("MODEL.PROPOSAL_GENERATOR.NAME", "RPN")
    plain = build_proposal_generator(cfg_rpn, shapes)
    assert type(sed) is SEDRPN and type(plain) is RPN
    assert sed.state_dict().keys() == plain.state_dict().keys()
    plain.load_state_dict(sed.state_dict())
    full, _ = toy_features(n=2, h=128, w=192)
    images = ImageList(torch.zeros(2, 3, 128, 192), [(128, 192), (120, 150)])
    sed.eval(), plain.eval()
    with torch.no_grad():
        p_sed, _ = sed(images, full)
        p_plain, _ = plain(images, full)
        p_helper = sed.proposals_from(sed.head_outputs(full), images.image_sizes)
    for a, b, c in zip(p_sed, p_plain, p_helper):
        assert torch.equal(a.proposal_boxes.tensor, b.proposal_boxes.tensor)
        assert torch.equal(a.proposal_boxes.tensor, c.proposal_boxes.tensor)
        assert torch.equal(a.objectness_logits, c.objectness_logits)
    outputs = sed.head_outputs(full)
    assert outputs.grids == [(128 // s, 192 // s) for s in STRIDES.values()]
