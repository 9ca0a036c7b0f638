"""One run per output folder, and no silent config change on ``--resume``.

:class:`OutputDirLock` is an exclusive ``fcntl.flock`` on ``OUTPUT_DIR/run.lock``, held for
the life of the training process. A ``flock`` belongs to the open file, and the operating system
releases it when the last descriptor of that file closes, which exiting does however a process
exits (crash, ``kill -9``, lost node). Processes started with ``exec`` never get the descriptor
(Python opens it non-inheritable), and processes forked from the training process (data-loader
workers) close their copy as they start (:func:`os.register_at_fork`), so the lock dies with the
training process, not seconds later with its workers (it did before: an immediate ``--resume``
after ``kill -9`` was refused under a dead pid). The file itself may stay, with the pid and host
of the last holder, and only serves to name the holder in the refusal, with whether that process
still runs. The lock is advisory and needs a file system with working ``flock`` (local disks;
NFSv4 and Lustre mounted with ``flock``).

:func:`config_differences` compares the run's config with the ``config.yaml`` Detectron2's
``default_setup`` wrote into ``OUTPUT_DIR`` when the run started, so that ``--resume`` with other
hyperparameters is refused with the list of differing keys (``tools/train_net.py
--allow-config-change`` accepts them). :data:`RESUME_FREE_KEYS` may change freely.

Only the main process (rank 0) takes the lock and makes the comparison.
"""
import errno
import fcntl
import os
import re
import socket

import yaml

__all__ = ["OutputDirLock", "OutputDirBusyError", "ConfigChangedError", "RESUME_FREE_KEYS",
           "config_differences", "check_resume_config"]

LOCK_NAME = "run.lock"

# descriptors of the locks this process holds, closed in every child forked from it
_HELD_FDS = set()


def _close_held_in_child():
    for fd in _HELD_FDS:
        try:
            os.close(fd)  # this process's copy only: the parent's lock stays
        except OSError:
            pass
    _HELD_FDS.clear()


os.register_at_fork(after_in_child=_close_held_in_child)

# Keys that a resumed run may change without --allow-config-change:
# OUTPUT_DIR: the same folder may be spelled differently (relative / absolute);
# MODEL.WEIGHTS: a resumed run loads the checkpoint in OUTPUT_DIR and ignores it;
# DATALOADER.NUM_WORKERS: d2ssod's loader seeds each sample by its stream position, so the
# number of worker processes does not change what is trained on.
RESUME_FREE_KEYS = ("OUTPUT_DIR", "MODEL.WEIGHTS", "DATALOADER.NUM_WORKERS")


class OutputDirBusyError(RuntimeError):
    """Another live process holds the output folder's lock."""


class ConfigChangedError(ValueError):
    """A resumed run's config differs from the one the run started with."""


class OutputDirLock:
    """Exclusive lock of ``folder`` for one training process (a context manager).

    ``acquire`` creates ``folder`` if needed and raises :class:`OutputDirBusyError`, naming the
    folder and the holder's pid and host, when another process holds it."""

    def __init__(self, folder):
        self.folder = os.path.abspath(folder)
        self.path = os.path.join(self.folder, LOCK_NAME)
        self._fd = None

    def acquire(self):
        os.makedirs(self.folder, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _read_holder(fd)
            os.close(fd)
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            raise OutputDirBusyError(
                f"OUTPUT_DIR {self.folder} is in use by another run ({holder}; lock file "
                f"{self.path}). Wait for it to finish, stop it, or choose another OUTPUT_DIR."
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on host {socket.gethostname()}\n".encode())
        os.fsync(fd)
        self._fd = fd
        _HELD_FDS.add(fd)
        return self

    def release(self):
        if self._fd is not None:
            _HELD_FDS.discard(self._fd)
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def _read_holder(fd):
    """``"held by pid P on host H, <whether P runs>"`` from the lock file."""
    try:
        text = os.pread(fd, 512, 0).decode(errors="replace").strip()
    except OSError:
        text = ""
    return f"held by {text}, {_liveness(text)}" if text else "holder unknown"


def _liveness(text):
    """Whether the process that ``"pid P on host H"`` names runs, in words. A lock outlives no
    process of its own, so a holder that does not run has just exited (the folder is free in a
    moment) or the file was written by a process that forked its holder without this module."""
    match = re.fullmatch(r"pid (\d+) on host (\S+)", text)
    if not match:
        return "liveness unknown"
    pid, host = int(match.group(1)), match.group(2)
    if host != socket.gethostname():
        return "on another host, whose processes cannot be checked from here"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return "which no longer runs: retry in a moment"
    except PermissionError:
        pass  # it exists, owned by another user
    return "running"


def _flatten(node, prefix=""):
    out = {}
    for key, value in node.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def config_differences(cfg, saved_yaml):
    """``[(key, saved value, new value)]`` for every key whose value differs between ``cfg``
    (a Detectron2 ``CfgNode``) and the config file ``saved_yaml``, sorted by key, except
    :data:`RESUME_FREE_KEYS`. A key present on one side only shows ``<absent>`` on the other.
    Both sides are compared as YAML data (tuples and lists are equal)."""
    with open(saved_yaml) as f:
        old = _flatten(yaml.safe_load(f) or {})
    new = _flatten(yaml.safe_load(cfg.dump()))
    missing = "<absent>"
    return [(k, old.get(k, missing), new.get(k, missing))
            for k in sorted(set(old) | set(new))
            if k not in RESUME_FREE_KEYS and old.get(k, missing) != new.get(k, missing)]


def check_resume_config(cfg, allow_change=False):
    """On ``--resume``: compare ``cfg`` with ``OUTPUT_DIR/config.yaml`` (if both it and a
    ``last_checkpoint`` exist, i.e. there is a run to continue). Raise
    :class:`ConfigChangedError` listing the differing keys unless ``allow_change``; return the
    differences (empty when identical or when there is nothing to compare with)."""
    saved = os.path.join(cfg.OUTPUT_DIR, "config.yaml")
    if not (os.path.isfile(saved)
            and os.path.isfile(os.path.join(cfg.OUTPUT_DIR, "last_checkpoint"))):
        return []
    diff = config_differences(cfg, saved)
    if diff and not allow_change:
        lines = "\n  ".join(f"{k}: {old!r} -> {new!r}" for k, old, new in diff)
        raise ConfigChangedError(
            f"--resume in {os.path.abspath(cfg.OUTPUT_DIR)} with a config that differs from the "
            f"one the run started with ({saved}) in {len(diff)} key(s):\n  {lines}\n"
            f"Resume with the original config file and options, or add --allow-config-change "
            f"to continue with the new values (config.yaml is then rewritten).")
    return diff
