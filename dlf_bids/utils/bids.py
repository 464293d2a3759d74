"""Finding the anatomical inputs of a BIDS dataset with pybids.

The unit of work is one T1w image: each T1w (per session, acquisition, run, ...) is segmented and
its outputs keep its entities. A T2w from the same subject and session is paired with it when one
exists (same run preferred), recorded now and used by the multimodal methods.
"""

from __future__ import annotations

import json
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import BadDataError, MissingInputError, NoFilesSelectedError, UsageError

DEFAULT_QUERIES = {
    "t1w": {"datatype": "anat", "suffix": "T1w", "extension": [".nii", ".nii.gz"]},
    "t2w": {"datatype": "anat", "suffix": "T2w", "extension": [".nii", ".nii.gz"]},
}
# Entities that tell one T1w of a subject from another; they are kept in the output names.
IMAGE_ENTITIES = ("session", "task", "acquisition", "ceagent", "reconstruction", "run", "echo", "part")


@dataclass(frozen=True)
class AnatomicalInput:
    """One T1w image to segment, with the T2w paired to it (if any)."""

    subject: str
    t1w: Path
    entities: dict = field(hash=False, compare=False)
    t2w: Path | None = None
    warnings: tuple[str, ...] = field(default=(), compare=False)  # from the input checks

    @property
    def prefix(self) -> str:
        """The BIDS name of the image without its suffix, e.g. ``sub-01_ses-pre_run-1``."""
        return re.sub(r"_T1w\.nii(\.gz)?$", "", self.t1w.name)

    @property
    def session(self) -> str | None:
        return self.entities.get("session")

    @property
    def name(self) -> str:
        """A name unique within the dataset, for workflow and log names."""
        parts = [f"sub_{self.subject}"]
        for key in IMAGE_ENTITIES:
            if key in self.entities:
                parts.append(f"{key[:3]}_{self.entities[key]}")
        return re.sub(r"[^A-Za-z0-9_]", "", "_".join(parts))


@dataclass
class CollectedInputs:
    anatomicals: list[AnatomicalInput]
    skipped: list[tuple[str, str]]  # (subject, reason): reported one line each, others go on


def strip_prefix(labels, prefix: str) -> list[str] | None:
    """Accept labels with or without their ``sub-``/``ses-`` prefix."""
    if not labels:
        return None
    return [lab[len(prefix):] if lab.startswith(prefix) else lab for lab in labels]


def check_bids_dir(bids_dir: Path) -> Path:
    """Refuse things that are not a BIDS dataset root, with the reason."""
    bids_dir = Path(bids_dir).absolute()
    if not bids_dir.exists():
        raise MissingInputError(f"BIDS directory {bids_dir} does not exist")
    if not bids_dir.is_dir():
        raise BadDataError(f"{bids_dir} is not a directory")
    has_description = (bids_dir / "dataset_description.json").is_file()
    if not has_description and re.fullmatch(r"(sub|ses)-[A-Za-z0-9]+", bids_dir.name):
        raise BadDataError(
            f"{bids_dir} looks like a subject/session folder; give the dataset root "
            f"(the folder holding dataset_description.json)"
        )
    if not has_description:
        raise BadDataError(f"{bids_dir} is not a BIDS dataset: it has no dataset_description.json")
    return bids_dir


def load_filters(path: Path | str | None) -> dict | None:
    """Read a ``--bids-filter-file``: JSON keyed by query (``t1w``, ``t2w``).

    ``null`` means the entity must be absent and ``"*"`` any value, as in fMRIPrep.
    """
    if path is None:
        return None
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"filter file {path} does not exist")
    try:
        filters = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UsageError(f"filter file {path} is not valid JSON ({err.msg}, line {err.lineno})")
    if not isinstance(filters, dict) or not all(isinstance(v, dict) for v in filters.values()):
        raise UsageError(f"filter file {path} must map query names to objects, e.g. {{\"t1w\": {{...}}}}")
    unknown = set(filters) - set(DEFAULT_QUERIES)
    if unknown:
        raise UsageError(f"filter file {path}: unknown queries {sorted(unknown)}; "
                         f"known: {sorted(DEFAULT_QUERIES)}")
    for query, entities in filters.items():
        _check_filter_entities(path, query, entities)
    return filters


def _check_filter_entities(path: Path, query: str, entities: dict) -> None:
    """Refuse entity names pybids would reject with a traceback (a typo such as 'acqusition')."""
    if "subject" in entities:
        # collect_anatomicals queries one subject at a time: a second 'subject' cannot be merged
        raise UsageError(f"filter file {path}: \"subject\" in \"{query}\" is not allowed; "
                         "select participants with --participant-label")
    valid = _filter_entities()
    unknown = sorted(set(entities) - set(valid))
    if unknown:
        noun = "entity" if len(unknown) == 1 else "entities"
        raise UsageError(f"filter file {path}: unknown {noun} {', '.join(map(repr, unknown))} in "
                         f"\"{query}\"; valid: {', '.join(valid)}")


def _filter_entities() -> list[str]:
    """Entity names a filter may use: pybids' BIDS entities (datatype, suffix, extension too)."""
    from bids.layout import Config as BIDSConfig

    return sorted(set(BIDSConfig.load("bids").entities) - {"subject"})


def _to_pybids(query: dict) -> dict:
    from bids.layout import Query

    out = {}
    for key, value in query.items():
        if value is None:
            out[key] = Query.NONE
        elif value == "*":
            out[key] = Query.ANY
        else:
            out[key] = value
    return out


def build_queries(filters: dict | None) -> dict:
    queries = {name: dict(q) for name, q in DEFAULT_QUERIES.items()}
    for name, extra in (filters or {}).items():
        queries[name].update(extra)
    return {name: _to_pybids(q) for name, q in queries.items()}


def load_layout(bids_dir: Path, database_dir: Path | None = None, reset: bool = False):
    """Index the dataset with pybids, caching the index in ``database_dir`` when given."""
    from bids import BIDSLayout
    from bids.layout import BIDSLayoutIndexer

    # Sidecar metadata is not needed to find images, and one malformed JSON would crash indexing.
    indexer = BIDSLayoutIndexer(
        validate=False,
        index_metadata=False,
        ignore=("code", "stimuli", "sourcedata", "models", "derivatives", re.compile(r"^\.")),
    )
    if database_dir is None:
        return BIDSLayout(str(bids_dir), validate=False, indexer=indexer)
    Path(database_dir).mkdir(parents=True, exist_ok=True)
    # Runs sharing a work dir (cluster array tasks, two terminals) share the index: one builds it
    # while the others wait, or a reader would see a half-written index and miss subjects.
    # A run killed while indexing leaves an index without the marker: it is rebuilt, not trusted.
    complete = Path(database_dir) / ".index-complete"
    with _exclusive_lock(Path(database_dir) / ".lock"):
        reset = reset or not complete.exists()
        complete.unlink(missing_ok=True)
        layout = BIDSLayout(str(bids_dir), validate=False, indexer=indexer,
                            database_path=str(database_dir), reset_database=reset)
        if not reset and Path(layout.root).resolve() != Path(bids_dir).resolve():
            # an index of another dataset: never answer queries from it
            layout = BIDSLayout(str(bids_dir), validate=False, indexer=indexer,
                                database_path=str(database_dir), reset_database=True)
        complete.touch()
    return layout


@contextmanager
def _exclusive_lock(path: Path):
    """An advisory lock (``flock``) held for the ``with`` block; released if the process dies."""
    import fcntl

    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _pick_t2w(t1w_entities: dict, t2w_files) -> Path | None:
    same_session = [f for f in t2w_files if f.entities.get("session") == t1w_entities.get("session")]
    if not same_session:
        return None
    same_run = [f for f in same_session if f.entities.get("run") == t1w_entities.get("run")]
    chosen = sorted(same_run or same_session, key=lambda f: f.path)[0]
    return Path(chosen.path)


def collect_anatomicals(layout, participant_labels=None, session_labels=None,
                        filters: dict | None = None) -> CollectedInputs:
    """All T1w images to segment, with their T2w; subjects without T1w are listed as skipped."""
    all_subjects = sorted(layout.get_subjects())
    participant_labels = strip_prefix(participant_labels, "sub-")
    session_labels = strip_prefix(session_labels, "ses-")
    if participant_labels:
        missing = sorted(set(participant_labels) - set(all_subjects))
        if missing:
            raise MissingInputError(
                f"participant(s) {', '.join('sub-' + m for m in missing)} not found in {layout.root}"
            )
        subjects = sorted(set(participant_labels))
    else:
        subjects = all_subjects
    if not subjects:
        raise MissingInputError(f"no subjects (sub-* folders) found in {layout.root}")

    queries = build_queries(filters)
    if session_labels and any("session" in q for q in (filters or {}).values()):
        # pybids cannot take 'session' twice, and which of the two should win is unclear
        raise UsageError("sessions are given both by --session-label and in the filter file; "
                         "use one of them")
    session_query = {"session": session_labels} if session_labels else {}
    anatomicals, skipped = [], []
    for subject in subjects:
        t1ws = layout.get(subject=subject, **session_query, **queries["t1w"])
        if not t1ws:
            what = "matching the filters" if (filters or session_labels) else "in anat/"
            skipped.append((subject, f"no T1w image {what}"))
            continue
        t2ws = layout.get(subject=subject, **session_query, **queries["t2w"])
        for t1w in sorted(t1ws, key=lambda f: f.path):
            entities = {k: t1w.entities[k] for k in IMAGE_ENTITIES if k in t1w.entities}
            anatomicals.append(
                AnatomicalInput(subject, Path(t1w.path), entities, _pick_t2w(t1w.entities, t2ws))
            )
    if not anatomicals:
        reasons = "; ".join(f"sub-{s}: {r}" for s, r in skipped)
        if filters or session_labels:
            raise NoFilesSelectedError(f"the filters selected no T1w images ({reasons})")
        raise MissingInputError(f"no T1w images to process ({reasons})")
    return CollectedInputs(anatomicals, skipped)


def bids_uri(path: Path | str, dataset_root: Path | str, dataset_name: str) -> str:
    """``bids:<name>:<relative path>``: how sidecars point at their sources (BIDS >= 1.8)."""
    rel = Path(path).absolute().relative_to(Path(dataset_root).absolute())
    return f"bids:{dataset_name}:{rel.as_posix()}"
