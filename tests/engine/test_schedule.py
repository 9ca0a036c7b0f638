"""The step schedule: what each iteration reads, and what a resumed run must skip."""
import pytest

from d2ssod.engine.schedule import StepSchedule


def test_joint_reads_labeled_only_during_burn_in_then_both():
    s = StepSchedule(burn_in_iters=3, step_mode="joint")
    assert [s.batches_at(i) for i in range(5)] == [(True, False)] * 3 + [(True, True)] * 2


def test_alternate_reads_labeled_then_unlabeled_counted_from_the_end_of_burn_in():
    s = StepSchedule(burn_in_iters=10, step_mode="alternate")
    assert s.batches_at(9) == (True, False)
    # iterations 10..14 after burn-in read L, U, L, U, L
    assert [s.batches_at(i) for i in range(10, 15)] == [
        (True, False), (False, True), (True, False), (False, True), (True, False)]


def test_without_unlabeled_stream_every_iteration_is_supervised():
    s = StepSchedule(burn_in_iters=0, step_mode="alternate", reads_unlabeled=False)
    assert {s.batches_at(i) for i in range(20)} == {(True, False)}
    assert s.consumed(15) == (15, 0)


def test_consumed_by_hand():
    joint = StepSchedule(burn_in_iters=10, step_mode="joint")
    assert joint.consumed(0) == (0, 0)
    assert joint.consumed(4) == (4, 0)
    assert joint.consumed(15) == (15, 5)
    alternate = StepSchedule(burn_in_iters=10, step_mode="alternate")
    assert alternate.consumed(15) == (13, 2)
    assert alternate.consumed(16) == (13, 3)


@pytest.mark.parametrize("mode", ["joint", "alternate"])
def test_consumed_is_what_the_iterations_read(mode):
    s = StepSchedule(burn_in_iters=7, step_mode=mode)
    for start in (0, 1, 7, 8, 9, 30):
        reads = [s.batches_at(i) for i in range(start)]
        assert s.consumed(start) == (sum(r[0] for r in reads), sum(r[1] for r in reads))


def test_unknown_step_mode_names_the_key():
    with pytest.raises(ValueError, match=r"SSOD.STEP_MODE='alternating'.*'joint'"):
        StepSchedule(burn_in_iters=0, step_mode="alternating")


def test_burn_in_reads_unlabeled_only_when_asked_and_consumed_counts_it():
    s = StepSchedule(burn_in_iters=3, step_mode="joint", burn_in_reads_unlabeled=True)
    assert [s.batches_at(i) for i in range(5)] == [(True, True)] * 5
    assert s.consumed(2) == (2, 2) and s.consumed(5) == (5, 5)
    alternate = StepSchedule(burn_in_iters=3, step_mode="alternate", burn_in_reads_unlabeled=True)
    # burn-in 0..2 reads both, then L, U, L from iteration 3
    assert alternate.consumed(6) == (3 + 2, 3 + 1)
    assert [alternate.in_burn_in(i) for i in (2, 3)] == [True, False]
    # a run without an unlabeled stream never reads one, whatever the method asks
    supervised = StepSchedule(burn_in_iters=3, reads_unlabeled=False, burn_in_reads_unlabeled=True)
    assert supervised.consumed(5) == (5, 0)
