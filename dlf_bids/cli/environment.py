"""The process environment every dlf-bids command sets first: no network, no writes to $HOME.

Each console script's ``main`` calls :func:`prepare_environment` before anything imports nipype,
niworkflows, templateflow or matplotlib (they read these variables once, at import or when first
used), so this module imports none of them.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

from .. import OFFLINE  # the one list; the package applies it on import too
from ..utils.files import probe_writable_dir



def _user_dir(xdg_var: str, fallback: str) -> Path:
    return Path(os.environ.get(xdg_var) or Path(os.path.expanduser("~")) / fallback)


def _default_caches() -> dict[str, Path]:
    """Variable -> where its library writes when the variable is unset (Linux/XDG layout)."""
    return {
        # matplotlib (imported by monai/nilearn) keeps its config and font cache here and, when it
        # cannot, makes a temporary folder and warns on every run
        "MPLCONFIGDIR": _user_dir("XDG_CONFIG_HOME", ".config") / "matplotlib",
        # importing niworkflows imports templateflow, which unpacks its skeleton here and fails
        # the import when it cannot
        "TEMPLATEFLOW_HOME": _user_dir("XDG_CACHE_HOME", ".cache") / "templateflow",
    }


def _usable(folder: Path) -> bool:
    try:
        probe_writable_dir(folder)
    except OSError:
        return False
    return True


def _holds_files(folder: Path) -> bool:
    try:
        return folder.is_dir() and any(folder.iterdir())
    except OSError:
        return False


def prepare_environment() -> None:
    """Turn off network access of the libraries we use; move their caches out of an unwritable home.

    Variables the user has set are kept. A cache whose default folder cannot be written (a
    read-only or missing home, as under Singularity or a container's non-root user) is moved to
    one temporary folder for this process, removed at exit."""
    for name, value in OFFLINE.items():
        os.environ.setdefault(name, value)
    cache_root = None
    for name, default in _default_caches().items():
        if name in os.environ or _usable(default):
            continue
        if name == "TEMPLATEFLOW_HOME" and _holds_files(default):
            # a read-only home with templates filled in beforehand is how they reach an offline
            # container: read them there (moving the variable would hide them)
            continue
        if cache_root is None:
            try:
                cache_root = Path(tempfile.mkdtemp(prefix="dlf-bids-cache-"))
            except OSError:
                return  # no writable temporary folder either: the libraries' own fallbacks apply
            atexit.register(shutil.rmtree, cache_root, ignore_errors=True)
        os.environ[name] = str(cache_root / name.lower())
