"""Writing files safely: atomic replacement, never through a planted link; probing a folder.

Every text file dlf-bids writes into an output folder goes through :func:`write_text_atomic`
(model files through :func:`atomic_open`; images are staged and renamed the same way by
:class:`dlf_bids.interfaces.bids.DerivativesDataSink`): the content goes to a new file beside the
target, then ``os.replace`` renames it over the target. A reader never sees half a file, and a symbolic link
already at the target's name is replaced by the new file, not followed: ``open(path, "w")``
would write into whatever the link points to, even outside the output folder.
"""

from __future__ import annotations

import os
import uuid
from contextlib import contextmanager
from pathlib import Path

from ..errors import CannotWriteError


@contextmanager
def atomic_open(path, binary: bool = False):
    """``with atomic_open(path) as fh: fh.write(...)``: ``path`` appears, complete, on exit.

    On an exception the temporary file is removed and ``path`` is left as it was."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    # O_EXCL: never reuse (or follow) something already at the temporary name; mode 0o666 leaves
    # the permissions to the umask, as for any other file the user's process creates
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())  # the data is on disk before the name points at it
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically, replacing any link at that name."""
    with atomic_open(path) as fh:
        fh.write(text)
    return Path(path)


def probe_writable_dir(path) -> None:
    """Raise :class:`OSError` unless ``path`` is, or can be made, a folder we can write files in.

    The probe writes a real file: permission bits do not bind root, so ``os.access`` says yes on
    a read-only mount or an immutable folder. It leaves nothing behind: the probe file and any
    folder it had to create are removed again (the run creates them when it writes for real)."""
    path = Path(path)
    created = []
    try:
        missing = []
        for folder in (path, *path.parents):
            if folder.exists():  # a folder, or a file that makes mkdir fail with "Not a directory"
                break
            missing.append(folder)
        for folder in reversed(missing):
            try:
                folder.mkdir()
            except FileExistsError:
                if not folder.is_dir():
                    raise
                continue  # made meanwhile by a concurrent run (array jobs): not ours to remove
            created.append(folder)
        probe = path / f".dlf-bids-probe-{uuid.uuid4().hex}"
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        probe.unlink()
    finally:
        for folder in reversed(created):
            try:
                folder.rmdir()
            except OSError:
                pass  # something else wrote there meanwhile: not ours to remove


def check_writable_dir(path, what: str) -> None:
    """:func:`probe_writable_dir` as a user error: ``CannotWriteError`` naming ``what`` and ``path``."""
    try:
        probe_writable_dir(path)
    except OSError as err:
        raise CannotWriteError(f"cannot write to {what} {path}: {err.strerror or err}") from None
