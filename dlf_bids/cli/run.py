"""``dlf-bids``: the BIDS-App entry point (participant and group levels)."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

from ..config import Config
from ..deepatlas_registration import REFINE_STEPS
from ..errors import BIDSValidationError, DlfBidsError, UsageError
from ..utils.files import check_writable_dir
from .environment import prepare_environment
from .parser import build_parser, default_nprocs

LOG = logging.getLogger("dlf_bids")


def _inside(path: Path, folder: Path) -> bool:
    """True if ``path`` is ``folder`` or below it, after resolving '..' and symbolic links."""
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def _fusion_methods(args) -> tuple[str, ...]:
    from ..fusion import FUSION_METHODS

    methods = args.fusion or (["dlf"] if args.dlf_model else ["jlf"])
    if "all" in methods:
        methods = [m for m in FUSION_METHODS if m != "dlf" or args.dlf_model]
    if "dlf" in methods and not args.dlf_model:
        raise UsageError("--fusion dlf needs a trained model: --dlf-model FILE (see dlf-bids-train)")
    return tuple(dict.fromkeys(methods))


def _model_file(path: Path | None, what: str) -> Path | None:
    """An optional model file, absolute; a path given but absent: exit 66."""
    from ..errors import MissingInputError

    if path is None:
        return None
    if not path.is_file():
        raise MissingInputError(f"{what} {path} does not exist")
    return path.absolute()


def _deepatlas_model(args) -> Path | None:
    if args.registration == "deepatlas" and args.deepatlas_model is None:
        raise UsageError("--registration deepatlas needs a trained model: --deepatlas-model FILE "
                         "(see dlf-bids-train-deepatlas)")
    if args.registration != "deepatlas" and args.deepatlas_model is not None:
        raise UsageError("--deepatlas-model is used by --registration deepatlas only")
    return _model_file(args.deepatlas_model, "DeepAtlas model")


def _deepatlas_refine_steps(args) -> int:
    if args.deepatlas_refine_steps is None:
        return REFINE_STEPS
    if args.registration != "deepatlas":
        raise UsageError("--deepatlas-refine-steps is used by --registration deepatlas only")
    return args.deepatlas_refine_steps


def _output_spaces(args):
    """``(templateflow home, resolved spaces)``; every template file checked before any work."""
    from ..templates import parse_output_spaces, resolve_output_spaces, templateflow_home

    spaces = parse_output_spaces(args.output_spaces)
    # only the participant level uses templates (the group level reads native segmentations)
    if not spaces or args.analysis_level != "participant":
        return None, ()
    home = templateflow_home()
    return home, resolve_output_spaces(spaces, home)


def config_from_args(args) -> Config:
    """Turn parsed arguments into the run's :class:`Config`, refusing unsafe paths."""
    from ..utils.bids import check_bids_dir, load_filters

    bids_dir = check_bids_dir(args.bids_dir)
    output_dir = args.output_dir.absolute()
    work_dir = args.work_dir.absolute()
    if _inside(output_dir, bids_dir):
        raise UsageError(f"output_dir {output_dir} is inside the input dataset; "
                         "dlf-bids never writes into bids_dir")
    if _inside(work_dir, bids_dir):
        raise UsageError(f"work dir {work_dir} is inside the input dataset; pass -w elsewhere")
    atlas_dir = args.atlas_dir.absolute() if args.atlas_dir else None
    plugin, plugin_args = "MultiProc", None
    if args.plugin_config is not None:
        from ..execution import load_plugin_config

        plugin, plugin_args = load_plugin_config(args.plugin_config)
    # a MultiProc file's n_procs/memory_gb apply unless the flags say otherwise
    nprocs = args.nprocs or (plugin_args or {}).get("n_procs") or default_nprocs()
    mem_gb = args.mem_gb or (plugin_args or {}).get("memory_gb")
    if atlas_dir and _inside(output_dir, atlas_dir):
        raise UsageError(f"output_dir {output_dir} is inside the atlas library")
    # before any work: a read-only mount would otherwise surface as a crash hours into the run
    check_writable_dir(output_dir, "output_dir")
    if args.analysis_level == "participant":  # the group level uses no work dir
        check_writable_dir(work_dir, "work dir")
    templateflow_home, output_spaces = _output_spaces(args)
    return Config(
        bids_dir=bids_dir, output_dir=output_dir, analysis_level=args.analysis_level,
        work_dir=work_dir, atlas_dir=atlas_dir,
        participant_labels=tuple(args.participant_label) if args.participant_label else None,
        session_labels=tuple(args.session_label) if args.session_label else None,
        bids_filters=load_filters(args.bids_filter_file),
        bids_database_dir=args.bids_database_dir.absolute() if args.bids_database_dir else None,
        fusion=_fusion_methods(args), registration_preset=args.registration_preset,
        registration=args.registration, deepatlas_model=_deepatlas_model(args),
        deepatlas_refine_steps=_deepatlas_refine_steps(args),
        dlf_model=_model_file(args.dlf_model, "DLF model"), device=args.device, dlf_force=args.dlf_force_modalities,
        atlas_batch=args.atlas_batch, dlf_probseg=args.dlf_probseg,
        tissue_model=_model_file(args.tissue_model, "tissue model"),
        output_spaces=output_spaces, templateflow_home=templateflow_home,
        nprocs=int(nprocs), omp_nthreads=args.omp_nthreads, mem_gb=mem_gb,
        plugin=plugin, plugin_args=plugin_args,
        seed=args.seed, skip_bids_validation=args.skip_bids_validation,
        stop_on_first_crash=args.stop_on_first_crash, verbose=args.verbose,
        reports_only=args.reports_only,
    )


def validate_input(config: Config) -> None:
    from ..utils.validator import validate_dataset, validator_available

    if config.skip_bids_validation:
        return
    if not validator_available():
        LOG.warning("bids-validator-deno not found: input not validated (install it, or pass "
                    "--skip-bids-validation to silence this)")
        return
    result = validate_dataset(config.bids_dir)
    if result.errors:
        raise BIDSValidationError(f"{config.bids_dir} fails BIDS validation: {result.summary()} "
                                  "(use --skip-bids-validation to go on anyway)")


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose < 0 else (logging.INFO if verbose < 2 else logging.DEBUG)
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s: %(message)s",
                        datefmt="%H:%M:%S")
    # nipype's own chatter only when asked for
    logging.getLogger("bidsschematools").setLevel(logging.WARNING)
    for name in ("nipype.workflow", "nipype.interface", "nipype.utils"):
        logging.getLogger(name).setLevel(logging.INFO if verbose >= 1 else logging.WARNING)


def main(argv=None) -> int:
    prepare_environment()
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    started = time.time()
    try:
        config = config_from_args(args)
        if config.reports_only:
            from .participant import run_reports_only

            code = run_reports_only(config)
        elif config.analysis_level == "participant":
            from .participant import run_participant_level

            code = run_participant_level(config, validate_input)
        else:
            from .group import run_group_level

            code = run_group_level(config)
    except DlfBidsError as err:
        print(f"dlf-bids: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("dlf-bids: interrupted", file=sys.stderr)
        return 130
    LOG.info("finished in %.0f s", time.time() - started)
    return code


if __name__ == "__main__":
    sys.exit(main())
