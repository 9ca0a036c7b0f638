"""One run per OUTPUT_DIR (the lock) and the config comparison on --resume
(d2ssod/engine/output_dir.py, used by tools/train_net.py)."""
import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest

import d2ssod  # noqa: F401
from d2ssod.engine import build_cfg
from d2ssod.engine import output_dir as OD
from d2ssod.engine.output_dir import OutputDirBusyError, OutputDirLock

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SUP = os.path.join(REPO, "configs/demo/supervised.yaml")
TRAIN_NET = os.path.join(REPO, "tools", "train_net.py")


def _hold_lock_in_child(folder):
    """A live process holding ``folder``'s lock; returns it once the lock is taken."""
    code = textwrap.dedent(f"""
        import sys, time
        from d2ssod.engine.output_dir import OutputDirLock
        lock = OutputDirLock({str(folder)!r}).acquire()
        print("locked", flush=True)
        sys.stdin.read()
    """)
    child = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "locked"
    return child


def test_a_live_holder_is_named_and_a_dead_one_does_not_block(tmp_path):
    child = _hold_lock_in_child(tmp_path)
    try:
        with pytest.raises(OutputDirBusyError) as e:
            OutputDirLock(tmp_path).acquire()
        msg = str(e.value)
        assert str(tmp_path) in msg
        assert f"pid {child.pid} on host {socket.gethostname()}, running" in msg
        assert "choose another OUTPUT_DIR" in msg

        # the same refusal from tools/train_net.py, before it writes anything into the folder
        run = subprocess.run([sys.executable, TRAIN_NET, "--config-file", SUP, "OUTPUT_DIR",
                              str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                             env=dict(os.environ, PYTHONWARNINGS="ignore"), timeout=300)
        assert run.returncode != 0
        assert (f"OUTPUT_DIR {tmp_path} is in use by another run (held by pid {child.pid}"
                in run.stderr)
        assert sorted(os.listdir(tmp_path)) == ["run.lock"]
    finally:
        child.stdin.close()
        child.wait(timeout=30)
    # the holder is gone (it could as well have crashed): its lock file stays, with its pid,
    # but the lock is free
    assert f"pid {child.pid}" in (tmp_path / "run.lock").read_text()
    with OutputDirLock(tmp_path) as lock:
        assert f"pid {os.getpid()}" in (tmp_path / "run.lock").read_text()
        with pytest.raises(OutputDirBusyError, match=f"pid {os.getpid()} on host .*, running"):
            OutputDirLock(tmp_path).acquire()  # a second descriptor, even in this process
        # ... and that refusal did not drop this process's lock (closing any descriptor of
        # the file would): another process is still refused
        _refused_in_child(tmp_path)
    assert lock._fd is None
    OutputDirLock(tmp_path).acquire().release()


def _refused_in_child(folder):
    code = textwrap.dedent(f"""
        from d2ssod.engine.output_dir import OutputDirBusyError, OutputDirLock
        try:
            OutputDirLock({str(folder)!r}).acquire()
        except OutputDirBusyError as e:
            print(e)
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, timeout=120).stdout
    assert f"held by pid {os.getpid()}" in out, out


def test_the_lock_dies_with_its_process_even_while_its_forked_children_live(tmp_path):
    # what a data-loader worker is: a forked child that outlives its parent's kill -9 by
    # seconds. It must not keep the folder locked.
    code = textwrap.dedent(f"""
        import os, sys, time
        from d2ssod.engine.output_dir import OutputDirLock
        lock = OutputDirLock({str(tmp_path)!r}).acquire()
        worker = os.fork()
        if worker == 0:
            time.sleep(60)
            os._exit(0)
        print(worker, flush=True)
        sys.stdin.read()
    """)
    parent = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    worker = int(parent.stdout.readline())
    try:
        parent.kill()
        parent.wait(timeout=30)
        os.kill(worker, 0)  # the worker still runs
        with OutputDirLock(tmp_path):  # at once, no retry
            assert f"pid {os.getpid()}" in (tmp_path / "run.lock").read_text()
    finally:
        os.kill(worker, signal.SIGKILL)


def test_a_refusal_says_whether_the_named_holder_runs(tmp_path):
    host = socket.gethostname()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    assert OD._liveness(f"pid {os.getpid()} on host {host}") == "running"
    assert "no longer runs" in OD._liveness(f"pid {dead.pid} on host {host}")
    assert "another host" in OD._liveness(f"pid {os.getpid()} on host not-{host}")
    assert OD._liveness("garbage") == "liveness unknown"


def _started_run(folder, *opts):
    """What a started run leaves for --resume: config.yaml and a last_checkpoint."""
    cfg = build_cfg(SUP, ["OUTPUT_DIR", str(folder), *opts])
    (folder / "config.yaml").write_text(cfg.dump())
    (folder / "last_checkpoint").write_text("model_0000009.pth")
    return cfg


def test_resume_with_changed_keys_lists_them_and_needs_the_flag(tmp_path):
    _started_run(tmp_path, "SOLVER.BASE_LR", "0.01", "SEED", "5")
    same = build_cfg(SUP, ["OUTPUT_DIR", str(tmp_path), "SOLVER.BASE_LR", "0.01", "SEED", "5",
                           # free to change on resume
                           "MODEL.WEIGHTS", "other.pth", "DATALOADER.NUM_WORKERS", "7"])
    assert OD.check_resume_config(same) == []

    changed = build_cfg(SUP, ["OUTPUT_DIR", str(tmp_path), "SOLVER.BASE_LR", "0.02",
                              "SOLVER.STEPS", "(10, 20)"])
    expected = [("SEED", 5, -1), ("SOLVER.BASE_LR", 0.01, 0.02),
                ("SOLVER.STEPS", list(build_cfg(SUP).SOLVER.STEPS), [10, 20])]
    assert OD.config_differences(changed, tmp_path / "config.yaml") == expected
    with pytest.raises(OD.ConfigChangedError) as e:
        OD.check_resume_config(changed)
    msg = str(e.value)
    assert "in 3 key(s)" in msg and "SOLVER.BASE_LR: 0.01 -> 0.02" in msg and "SEED: 5 -> -1" in msg
    assert "--allow-config-change" in msg
    assert OD.check_resume_config(changed, allow_change=True) == expected

    # a key only one side has (e.g. a d2ssod version that added one) counts as a difference
    text = (tmp_path / "config.yaml").read_text().replace("SEED: 5\n", "SEED: 5\nOLD_KEY: 1\n")
    (tmp_path / "config.yaml").write_text(text)
    assert ("OLD_KEY", 1, "<absent>") in OD.config_differences(changed, tmp_path / "config.yaml")
    # nothing to compare with: no checkpoint yet (a first run started with --resume)
    os.remove(tmp_path / "last_checkpoint")
    assert OD.check_resume_config(changed) == []


def test_train_net_refuses_a_changed_resume_and_accepts_it_with_the_flag(tmp_path):
    def train_net(*args):
        cmd = [sys.executable, TRAIN_NET, "--config-file", SUP, *args, "OUTPUT_DIR", str(tmp_path),
               "SOLVER.IMS_PER_BATCH", "1", "DATALOADER.NUM_WORKERS", "0", "TEST.EVAL_PERIOD",
               "0", "DATASETS.TEST", "()", "INPUT.MIN_SIZE_TRAIN", "(96,)",
               "INPUT.MAX_SIZE_TRAIN", "128", "SOLVER.CHECKPOINT_PERIOD", "1"]
        return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                              env=dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1"))

    first = train_net("SOLVER.MAX_ITER", "1")
    assert first.returncode == 0, first.stderr[-3000:]
    refused = train_net("--resume", "SOLVER.MAX_ITER", "2")
    assert refused.returncode != 0
    assert "in 1 key(s):\n  SOLVER.MAX_ITER: 1 -> 2" in refused.stderr
    assert "MAX_ITER: 1\n" in (tmp_path / "config.yaml").read_text()  # left untouched
    accepted = train_net("--resume", "--allow-config-change", "SOLVER.MAX_ITER", "2")
    assert accepted.returncode == 0, accepted.stderr[-3000:]
    out = accepted.stdout + accepted.stderr
    assert "resuming with 1 changed key(s): SOLVER.MAX_ITER: 1 -> 2" in out
    assert "Starting training from iteration 1" in out
    assert "MAX_ITER: 2\n" in (tmp_path / "config.yaml").read_text()
