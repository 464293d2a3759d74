"""One typed configuration object, built once by the command line and read by every builder."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from .deepatlas_registration import REFINE_STEPS
from .fusion import FUSION_METHODS
from .registration import REGISTRATION_ENGINES, REGISTRATION_PRESETS
from .templates import OutputSpace


@dataclass(frozen=True)
class Config:
    """Everything a dlf-bids run needs to know. Paths are absolute."""

    bids_dir: Path
    output_dir: Path
    analysis_level: str
    work_dir: Path
    atlas_dir: Path | None = None
    participant_labels: tuple[str, ...] | None = None
    session_labels: tuple[str, ...] | None = None
    bids_filters: dict | None = field(default=None, hash=False)
    bids_database_dir: Path | None = None
    fusion: tuple[str, ...] = ("jlf",)
    registration_preset: str = "quick"  # ANTs preset (--registration ants)
    registration: str = "ants"  # atlas-to-subject engine: ants or deepatlas
    deepatlas_model: Path | None = None  # trained DeepAtlas model (dlf-bids-train-deepatlas)
    deepatlas_refine_steps: int = REFINE_STEPS  # instance-optimisation steps per atlas pair
    dlf_model: Path | None = None  # trained Deep Label Fusion model (dlf-bids-train)
    device: str = "auto"  # where DLF runs: auto (GPU when there is one), cpu or cuda
    dlf_force: bool = False  # feed noise for a missing modality even without ModAug
    atlas_batch: int = 4  # atlases per DLF forward pass (bounds memory)
    dlf_probseg: bool = False  # also write DLF's per-label probabilities (one 4D probseg)
    tissue_model: Path | None = None  # NeuroNet model (dlf-bids-train-neuronet); None: no step
    # --output-spaces: templates, resolved to files in templateflow_home before any work
    output_spaces: tuple[OutputSpace, ...] = ()
    templateflow_home: Path | None = None
    # execution
    nprocs: int = field(default_factory=lambda: len(os.sched_getaffinity(0)))
    omp_nthreads: int | None = None
    mem_gb: float | None = None
    plugin: str = "MultiProc"  # Nipype execution plugin (--plugin-config; see dlf_bids.execution)
    plugin_args: dict | None = field(default=None, hash=False)  # from the plugin file
    seed: int = 0
    skip_bids_validation: bool = False
    stop_on_first_crash: bool = False
    verbose: int = 0
    reports_only: bool = False  # rebuild the reports from the outputs; run nothing

    def __post_init__(self):
        unknown = set(self.fusion) - set(FUSION_METHODS)
        if unknown:
            raise ValueError(f"unknown fusion method(s) {sorted(unknown)}")
        if self.registration_preset not in REGISTRATION_PRESETS:
            raise ValueError(f"unknown registration preset {self.registration_preset!r}")
        if self.registration not in REGISTRATION_ENGINES:
            raise ValueError(f"unknown registration engine {self.registration!r}")
        if self.registration == "deepatlas" and self.deepatlas_model is None:
            raise ValueError("registration 'deepatlas' needs a trained model (deepatlas_model)")
        if self.deepatlas_refine_steps < 0:
            raise ValueError(f"deepatlas_refine_steps must be >= 0, got {self.deepatlas_refine_steps}")
        if "dlf" in self.fusion and self.dlf_model is None:
            raise ValueError("fusion 'dlf' needs a trained model (dlf_model)")
        if self.output_spaces and (self.templateflow_home is None
                                   or any(s.t1w is None for s in self.output_spaces)):
            # the graph needs the template files: resolve_output_spaces() finds them
            raise ValueError("output_spaces must be resolved (templates.resolve_output_spaces) "
                             "and come with their templateflow_home")

    @property
    def threads_per_process(self) -> int:
        """Threads each registration/fusion node may use.

        Default as fMRIPrep: leave one core to run another node in parallel, at most 8.
        """
        default = max(1, min(self.nprocs - 1, 8))
        return max(1, min(self.omp_nthreads or default, self.nprocs))

    @property
    def registration_threads(self) -> int:
        """ITK threads per registration: 1 unless --omp-nthreads says otherwise.

        Single-threaded registration is the only bit-reproducible one; MultiProc runs the atlases
        in parallel instead, which uses the cores as well when there are several atlases.
        """
        return max(1, min(self.omp_nthreads or 1, self.nprocs))

    @property
    def database_dir(self) -> Path:
        """The pybids index: one per dataset in the work dir, so a shared work dir never mixes them."""
        import hashlib

        key = hashlib.sha1(str(self.bids_dir.resolve()).encode()).hexdigest()[:12]
        return self.bids_database_dir or self.work_dir / "bids_db" / key
