"""Standard output spaces: ``--output-spaces`` parsed, and TemplateFlow templates found offline.

The syntax is fMRIPrep's (``MNI152NLin2009cAsym:res-2``; ``T1w`` and ``anat`` name the native
space, which is always written). niworkflows' ``Reference``/``OutputReferencesAction`` are not
used: they list the valid templates once, when niworkflows is imported, from the TemplateFlow
home of that moment, and read ``res-native`` as a BOLD grid, which has no meaning here.

Nothing is downloaded, ever (clusters often have no network): templates are looked up in
``TEMPLATEFLOW_HOME`` as it is when the run starts, with a TemplateFlow client of our own that
has DataLad and auto-update off, and only with ``ls`` (the local index). ``templateflow``'s
``get`` is never called: for a listed file that is absent or empty (TemplateFlow's placeholders
are zero-byte files) it would fetch it from S3 or with DataLad.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace
from pathlib import Path

from .errors import BadDataError, MissingInputError, UsageError

NATIVE_SPACES = ("T1w", "anat")  # always written; accepted so fMRIPrep command lines work
_NAME = re.compile(r"[A-Za-z0-9]+")  # a BIDS label: what a space- entity may hold
_RES = re.compile(r"res(?:olution)?-(\d+)")
_FILE_RES = re.compile(r"_res-0*(\d+)_")
NEVER_DOWNLOADS = ("dlf-bids never downloads (fetch it with templateflow where there is "
                   "network, then copy it there)")
OFFLINE_HINT = f"TEMPLATEFLOW_HOME must hold it: {NEVER_DOWNLOADS}"


@dataclass(frozen=True)
class OutputSpace:
    """A TemplateFlow template at one resolution, and once resolved, its files on this machine.

    ``resolution`` is TemplateFlow's ``res`` index (``res-2``), not a voxel size; ``None`` means
    resolution 1 (or the template's only one) and no ``res`` entity in the output names.
    """

    template: str
    resolution: int | None = None
    t1w: Path | None = None  # the template's T1w image: the output grid
    mask: Path | None = None  # its brain mask (desc-brain), when the home has one

    def __str__(self) -> str:
        return self.template if self.resolution is None else f"{self.template}:res-{self.resolution}"

    @property
    def entities(self) -> dict[str, str]:
        """Entities of the output names (pybids names: ``resolution`` is ``res``)."""
        ents = {"space": self.template}
        if self.resolution is not None:
            ents["resolution"] = str(self.resolution)
        return ents


def parse_output_space(value: str) -> tuple[OutputSpace, ...]:
    """One ``--output-spaces`` word: ``NAME[:res-N]...`` (several ``res-`` give several spaces).

    Native spaces give nothing (they are always written). Raises ``ValueError`` naming the problem.
    """
    name, *modifiers = value.rstrip(":").split(":")
    if not _NAME.fullmatch(name):
        raise ValueError(f"{value!r}: a space is a TemplateFlow template name such as "
                         "MNI152NLin2009cAsym, optionally followed by :res-N")
    if name in NATIVE_SPACES:
        if modifiers:
            raise ValueError(f"{value!r}: the native space {name} takes no modifiers")
        return ()
    resolutions = []
    for modifier in modifiers:
        match = _RES.fullmatch(modifier)
        if match is None:
            raise ValueError(f"{value!r}: unsupported modifier {modifier!r} (only res-N, "
                             "TemplateFlow's resolution index, e.g. res-2)")
        resolutions.append(int(match.group(1)))
    return tuple(OutputSpace(name, res) for res in resolutions or [None])


def parse_output_spaces(values) -> tuple[OutputSpace, ...]:
    """All words of ``--output-spaces``, in order, without repeats."""
    spaces = [space for value in values or () for space in parse_output_space(value)]
    return tuple(dict.fromkeys(spaces))


def templateflow_home() -> Path:
    """``TEMPLATEFLOW_HOME`` now, or TemplateFlow's default cache folder when it is unset."""
    if os.environ.get("TEMPLATEFLOW_HOME"):
        return Path(os.environ["TEMPLATEFLOW_HOME"]).absolute()
    from platformdirs import user_cache_dir  # what templateflow itself falls back to

    return Path(user_cache_dir("templateflow")).absolute()


def resolve_output_spaces(spaces, home: Path | None = None) -> tuple[OutputSpace, ...]:
    """Each space with its template files, checked; one-line errors before any work is done.

    :class:`MissingInputError` (exit 66) when the home, the template or the resolution is not
    there, :class:`BadDataError` (exit 65) for an empty or unreadable template file.
    """
    if not spaces:
        return ()
    home = Path(home) if home is not None else templateflow_home()
    client = _offline_client(home)
    return tuple(_resolve(client, home, space) for space in spaces)


def _offline_client(home: Path):
    # An empty or missing home would make templateflow unpack its skeleton of zero-byte
    # placeholders into it (and a later get() would try to download them): refuse first.
    if not home.is_dir() or not any(home.iterdir()):
        raise MissingInputError(f"TEMPLATEFLOW_HOME {home} is missing or empty, but must hold "
                                f"the templates of --output-spaces: {NEVER_DOWNLOADS}")
    from templateflow.client import TemplateFlowClient

    # our own client: templateflow.api's reads TEMPLATEFLOW_HOME once, when first imported
    return TemplateFlowClient(root=home, use_datalad=False, autoupdate=False)


def _resolve(client, home: Path, space: OutputSpace) -> OutputSpace:
    folder = home / f"tpl-{space.template}"
    if not folder.is_dir():
        raise MissingInputError(f"template {space.template} is not in TEMPLATEFLOW_HOME "
                                f"({folder} not found); {OFFLINE_HINT}")
    t1w = _pick_t1w(client, folder, space)
    resolution = _file_resolution(t1w)
    _check_template_file(t1w, home)
    mask = _brain_mask(client, space.template, resolution)
    if mask is not None:
        _check_template_file(mask, home)
    return replace(space, t1w=t1w, mask=mask)


def _pick_t1w(client, folder: Path, space: OutputSpace) -> Path:
    """The template's T1w at the asked resolution (none asked: resolution 1, or the only one)."""
    by_res = _t1w_by_resolution(client, space.template)
    if not by_res:
        raise MissingInputError(f"{folder} has no T1w image (tpl-{space.template}_*T1w.nii.gz); "
                                f"{OFFLINE_HINT}")
    wanted = space.resolution if space.resolution is not None else _default_resolution(
        space.template, by_res)
    if wanted not in by_res:
        raise MissingInputError(f"{folder} has no res-{wanted} T1w (available: "
                                f"{_listed(by_res)}); {OFFLINE_HINT}")
    return by_res[wanted]


def _t1w_by_resolution(client, template: str) -> dict[int | None, Path]:
    found = client.ls(template, suffix="T1w", desc=None, extension=".nii.gz")
    if any("cohort-" in f.name for f in found):
        raise UsageError(f"template {template} has cohorts, which --output-spaces does not "
                         "support yet")
    return {_file_resolution(f): f for f in found}


def _default_resolution(template: str, by_res: dict) -> int | None:
    """Resolution 1 (TemplateFlow's 1 mm for the MNI templates), or the template's only one."""
    if 1 in by_res:
        return 1
    if len(by_res) == 1:
        return next(iter(by_res))
    raise UsageError(f"template {template} has several resolutions ({_listed(by_res)}): choose "
                     f"one, e.g. {template}:res-{min(r for r in by_res if r is not None)}")


def _listed(by_res: dict) -> str:
    return ", ".join("no res entity" if r is None else f"res-{r}"
                     for r in sorted(by_res, key=lambda r: (r is not None, r or 0)))


def _file_resolution(path: Path) -> int | None:
    match = _FILE_RES.search(path.name)
    return int(match.group(1)) if match else None


def _brain_mask(client, template: str, resolution: int | None) -> Path | None:
    """The brain mask on the same grid, if the home really holds it (placeholders do not count)."""
    found = client.ls(template, resolution=resolution, suffix="mask", desc="brain",
                      extension=".nii.gz")
    present = [f for f in found if f.is_file() and f.stat().st_size > 0]
    return present[0] if len(present) == 1 else None


def _check_template_file(path: Path, home: Path) -> None:
    from .utils.images import check_anatomical

    if not path.is_file():  # e.g. a DataLad (git-annex) link whose content was never fetched
        raise MissingInputError(f"template file {path} is a link to nothing (not downloaded); "
                                f"{OFFLINE_HINT}")
    try:
        check_anatomical(path)
    except BadDataError as err:
        hint = (" (TemplateFlow's placeholder for a file never downloaded: put the real file "
                f"in {home})" if path.stat().st_size == 0 else "")
        raise BadDataError(f"template file {path} is unusable: {err}{hint}") from None


def registration_targets(spaces) -> dict[str, OutputSpace]:
    """For each template, the resolved space whose T1w the subject is registered to.

    One registration per template serves all its resolutions (a transform maps physical
    space, whatever the grid): the finest grid asked for, so no resolution is lost.
    """
    targets: dict[str, OutputSpace] = {}
    for space in spaces:
        current = targets.get(space.template)
        if current is None or _voxel_volume(space.t1w) < _voxel_volume(current.t1w):
            targets[space.template] = space
    return targets


def _voxel_volume(path: Path) -> float:
    import nibabel as nb
    import numpy as np

    return float(np.prod(nb.load(str(path)).header.get_zooms()[:3]))
