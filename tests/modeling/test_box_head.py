"""box_predictions (d2ssod/modeling/box_head.py): several box sets through the demo detector's
box branch in one head call give the rows of one call per set."""
import torch

import d2ssod  # noqa: F401
from d2ssod.modeling.box_head import box_predictions
from sed_helpers import toy_features


def test_groups_share_one_head_call_and_match_one_call_per_group(sed_model):
    heads = sed_model.roi_heads
    full, down = toy_features(n=2, h=256, w=256)
    g = torch.Generator().manual_seed(0)

    def boxes(n):
        xy = torch.rand(n, 2, generator=g) * 150
        return torch.cat([xy, xy + 8 + torch.rand(n, 2, generator=g) * 90], dim=1)

    groups = [(full, [boxes(3), boxes(2)]), (down, [boxes(4), boxes(0)]),
              (full, [boxes(1), boxes(5)])]
    calls = []
    hook = heads.box_head.register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        got = box_predictions(heads, groups)
        assert calls == [1]
        separate = [box_predictions(heads, [group])[0] for group in groups]
    hook.remove()
    assert [tuple(s.shape[:1]) for s, _ in got] == [(5,), (4,), (6,)]
    for (scores, deltas), (ref_scores, ref_deltas) in zip(got, separate):
        assert deltas.shape == (scores.shape[0], 4 * (scores.shape[1] - 1))
        assert torch.allclose(scores, ref_scores, atol=1e-5)
        assert torch.allclose(deltas, ref_deltas, atol=1e-5)
    # the groups are not interchangeable: other features, other predictions
    with torch.no_grad():
        [(on_down, _)] = box_predictions(heads, [(down, groups[0][1])])
    assert not torch.allclose(got[0][0], on_down, atol=1e-3)
