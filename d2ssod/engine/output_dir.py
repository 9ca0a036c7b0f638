"""One run per output folder, and no silent config change on ``--resume``.

:class:`OutputDirLock` is an exclusive ``fcntl.flock`` on ``OUTPUT_DIR/run.lock``, held for
the life of the training process. The operating system releases a ``flock`` when its holder
exits, however it exits (crash, ``kill -9``, lost node), so a dead run never leaves the folder
locked: the file itself may stay, with the pid and host of the last holder, and only serves to
name the holder in the refusal. The lock is advisory and needs a file system with working
``flock`` (local disks; NFSv4 and Lustre mounted with ``flock``).

:func:`config_differences` compares the run's config with the ``config.yaml`` Detectron2's
``default_setup`` wrote into ``OUTPUT_DIR`` when the run started, so that ``--resume`` with other
hyperparameters is refused with the list of differing keys (``tools/train_net.py
--allow-config-change`` accepts them). :data:`RESUME_FREE_KEYS` may change freely.

Only the main process (rank 0) takes the lock and makes the comparison.
"""
import errno
import fcntl
import os
import socket

import yaml

__all__ = ["OutputDirLock", "OutputDirBusyError", "ConfigChangedError", "RESUME_FREE_KEYS",
           "config_differences", "check_resume_config"]

LOCK_NAME = "run.lock"

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
        return self

    def release(self):
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def _read_holder(fd):
    try:
        text = os.pread(fd, 512, 0).decode(errors="replace").strip()
    except OSError:
        text = ""
    return f"held by {text}" if text else "holder unknown"


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
    if not (os.path.isfile(saved) and os.path.isfile(os.path.join(cfg.OUTPUT_DIR, "last_checkpoint"))):
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
