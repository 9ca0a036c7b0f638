"""Shared pieces of the SED modeling tests (importable as ``sed_helpers``: pytest puts
``tests/modeling`` on ``sys.path`` for its test files; the ``sed_model`` fixture is in
``conftest.py``): the demo SED config and model, and feature dicts built so that level k of x↓
*is* level k+1 of x."""
import copy
import os

import torch
from detectron2.modeling import build_model

from d2ssod.engine import build_cfg

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SED = os.path.join(REPO, "configs/demo/sed.yaml")
STRIDES = {"p2": 4, "p3": 8, "p4": 16, "p5": 32, "p6": 64}


def sed_cfg(*opts):
    """The demo SED config without ImageNet weights, with ``opts`` merged."""
    return build_cfg(SED, ["MODEL.MOBILENETV2.PRETRAINED", "", *[str(o) for o in opts]])


def build_sed_model():
    """The demo SED student in training mode, seeded."""
    torch.manual_seed(0)
    return build_model(sed_cfg()).train()


def randomised_rpn(model, seed=7):
    """A copy of ``model``'s RPN with weights far from its near-zero initialisation, so that
    objectness and deltas vary across anchors."""
    rpn = copy.deepcopy(model.proposal_generator)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in rpn.rpn_head.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return rpn


def padded_toy_features(n=1, c=64, h=160, w=224, seed=0):
    """x's features (p2..p6 of an h × w input, h, w multiples of 32 but not 64) and x↓'s for the
    input x / 2 padded by 16 pixels: x↓[level k] = x[level k+1] in its top-left cells, zero in
    the cells of the padding (as many as 16 / stride(level k)); x↓'s p6 is random."""
    g = torch.Generator().manual_seed(seed)
    names = list(STRIDES)
    full = {name: torch.randn(n, c, -(-h // s), -(-w // s), generator=g)
            for name, s in STRIDES.items()}
    down = {}
    for k, name in enumerate(names[:-1]):
        s = STRIDES[name]
        grid = ((h // 2 + 16) // s, (w // 2 + 16) // s)
        up = full[names[k + 1]]
        down[name] = torch.zeros(n, c, *grid)
        down[name][..., : up.shape[-2], : up.shape[-1]] = up
    down["p6"] = torch.randn(n, c, 2, 2, generator=g)
    return full, down


def toy_features(n=2, c=64, h=128, w=128, seed=0):
    """Features of x (p2..p6 for an h x w input) and of x↓ with x↓[level k] = x[level k+1];
    x↓'s p6 (no partner) is random."""
    g = torch.Generator().manual_seed(seed)
    full = {name: torch.randn(n, c, h // s, w // s, generator=g) for name, s in STRIDES.items()}
    names = list(STRIDES)
    down = {names[k]: full[names[k + 1]].clone() for k in range(len(names) - 1)}
    down["p6"] = torch.randn(n, c, h // 128 or 1, w // 128 or 1, generator=g)
    return full, down
