"""The BIDS-App command line: ``dlf-bids bids_dir output_dir {participant,group}``."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from .. import __version__
from ..deepatlas_registration import REFINE_STEPS
from ..fusion import FUSION_METHODS
from ..registration import REGISTRATION_ENGINES, REGISTRATION_PRESETS

EPILOG = """\
examples:
  dlf-bids /data/ds001 /data/ds001-seg participant --atlas-dir /data/atlases --participant-label 01 02
  dlf-bids /data/ds001 /data/ds001-seg group

exit codes: 0 success, 1 a participant failed, 2 bad arguments (argparse), 16 BIDS validation
failed, 17 unknown analysis level, 18 the filters selected no files, 64 usage error, 65 bad input
data, 66 missing input, 69 not enough memory (--mem-gb), 73 output or work dir not writable,
130 interrupted.
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        # an unknown analysis level has its own exit code in the BIDS-Apps spec
        if "analysis_level" in message and "invalid choice" in message:
            self.print_usage()
            self.exit(17, f"{self.prog}: error: {message}\n")
        super().error(message)


def _int_at_least(minimum: int):
    """An argparse ``type``: an integer no smaller than ``minimum`` (else exit 2 with a reason)."""

    def int_(value: str) -> int:
        n = int(value)
        if n < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return n

    int_.__name__ = "int"  # argparse names the type in "invalid int value: 'x'"
    return int_


_positive_int, _non_negative_int = _int_at_least(1), _int_at_least(0)


def _output_space(value: str) -> str:
    """Check a ``--output-spaces`` word's syntax here (exit 2); templates are found later."""
    from ..templates import parse_output_space

    try:
        parse_output_space(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="dlf-bids",
        description="Brain MRI segmentation from a BIDS dataset into BIDS-Derivatives: multi-atlas "
                    "registration (ANTs), then Deep Label Fusion (with a model from dlf-bids-train), "
                    "joint label fusion or majority voting.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("bids_dir", type=Path, help="root of the input BIDS dataset (read only)")
    parser.add_argument("output_dir", type=Path,
                        help="where derivatives are written (must be outside bids_dir)")
    parser.add_argument("analysis_level", choices=["participant", "group"],
                        help="participant: segment each T1w; group: summarise all participants")
    parser.add_argument("--version", action="version", version=f"dlf-bids {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv: debug)")

    sel = parser.add_argument_group("selecting inputs")
    sel.add_argument("--participant-label", "--participant_label", nargs="+", metavar="LABEL",
                     help="subjects to process, with or without 'sub-' (default: all)")
    sel.add_argument("--session-label", nargs="+", metavar="LABEL",
                     help="sessions to process, with or without 'ses-' (default: all)")
    sel.add_argument("--bids-filter-file", type=Path, metavar="FILE",
                     help="JSON of pybids filters per query, e.g. "
                          '{"t1w": {"acquisition": "mprage"}}; null = entity absent, "*" = any')
    sel.add_argument("--bids-database-dir", type=Path, metavar="DIR",
                     help="where to keep (and reuse) the pybids index (default: <work-dir>/bids_db)")
    sel.add_argument("--skip-bids-validation", action="store_true",
                     help="do not run the BIDS validator on the input dataset")

    seg = parser.add_argument_group("segmentation")
    seg.add_argument("--atlas-dir", type=Path, metavar="DIR",
                     help="atlas library (images + label maps; see README) — required for participant")
    seg.add_argument("--fusion", nargs="+", choices=(*FUSION_METHODS, "all"), default=None,
                     metavar="METHOD",
                     help=f"label fusion method(s), any of {', '.join(FUSION_METHODS)}, or all "
                          "(default: dlf when --dlf-model is given, else jlf)")
    seg.add_argument("--dlf-model", type=Path, metavar="FILE",
                     help="a trained Deep Label Fusion model (from dlf-bids-train)")
    seg.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                     help="where DLF runs: auto picks the GPU when there is one (default auto)")
    seg.add_argument("--dlf-force-modalities", action="store_true",
                     help="run a model whose modality is missing even though it was not trained "
                          "with ModAug (the missing channel becomes noise; results may be poor)")
    seg.add_argument("--atlas-batch", type=_positive_int, default=4,
                     help="atlases per DLF forward pass; lower it to save memory (default 4)")
    seg.add_argument("--dlf-probseg", action="store_true",
                     help="also write DLF's per-label probabilities as one 4D probseg image "
                          "(volume k = k-th label of the seg-dlf look-up table; large at 1 mm)")
    seg.add_argument("--registration", choices=REGISTRATION_ENGINES, default="ants",
                     help="how atlases are registered to the subject: ants (antspyx, see "
                          "--registration-preset) or deepatlas (a learned network, one pass per "
                          "atlas after an affine alignment; needs --deepatlas-model; also writes "
                          "the network's own seg-deepatlas and each atlas-to-T1w transform)")
    seg.add_argument("--deepatlas-model", type=Path, metavar="FILE",
                     help="a trained DeepAtlas model (from dlf-bids-train-deepatlas)")
    seg.add_argument("--deepatlas-refine-steps", type=_non_negative_int, metavar="N",
                     help="with --registration deepatlas: steps of instance optimisation that "
                          "refine the network's warp of each atlas on that pair (~0.2 s each on "
                          f"a 3 mm model grid; 0: the network's warp alone; default {REFINE_STEPS})")
    seg.add_argument("--tissue-model", type=Path, metavar="FILE",
                     help="a NeuroNet model (dlf-bids-train-neuronet): also write the tissue "
                          "dseg + label-GM/WM/CSF probseg (sMRIPrep/fMRIPrep --derivatives form) "
                          "and one seg-<protocol> dseg per other protocol of the model")
    seg.add_argument("--registration-preset", choices=sorted(REGISTRATION_PRESETS), default="quick",
                     help="ANTs registration: " + ", ".join(f"{k} = {v}" for k, v in
                                                             sorted(REGISTRATION_PRESETS.items())))

    seg.add_argument("--output-spaces", nargs="+", type=_output_space, metavar="SPACE",
                     help="also write each segmentation in these TemplateFlow templates "
                          "(fMRIPrep syntax, e.g. MNI152NLin2009cAsym:res-2; no res: resolution "
                          "1), with the T1w<->template transforms; templates are read from "
                          "TEMPLATEFLOW_HOME and never downloaded")

    perf = parser.add_argument_group("execution")
    perf.add_argument("-w", "--work-dir", type=Path, default=Path("work"),
                      help="intermediate files; reuse it to resume a run (default: ./work)")
    perf.add_argument("--nprocs", "--n-cpus", type=_positive_int, default=None,
                      help="processes run in parallel (default: all available cores)")
    perf.add_argument("--omp-nthreads", type=_positive_int, default=None,
                      help="threads per process (registration, fusion)")
    perf.add_argument("--mem-gb", type=float, default=None, metavar="GB",
                      help="memory limit in GB (gigabytes) for the scheduler")
    perf.add_argument("--plugin-config", type=Path, metavar="FILE",
                      help="Nipype plugin settings (YAML: 'plugin' and 'plugin_args'), e.g. "
                           "workflows/plugins/slurm.yml to run every node as a SLURM job "
                           "(default: MultiProc on this machine)")
    perf.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    perf.add_argument("--reports-only", action="store_true",
                      help="only rebuild the HTML reports (sub-<label>.html) and "
                           "logs/CITATION.md/.bib from the outputs and status records already in "
                           "output_dir; runs no workflow")
    perf.add_argument("--stop-on-first-crash", action="store_true",
                      help="stop everything at the first failure instead of finishing other subjects")
    return parser


def default_nprocs() -> int:
    return len(os.sched_getaffinity(0))
