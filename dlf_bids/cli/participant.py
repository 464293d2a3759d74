"""The participant level: find inputs, build the graph, run it, say what happened."""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import replace
from datetime import datetime
from pathlib import Path

from ..config import Config
from ..errors import BadDataError, ResourceError, UsageError

LOG = logging.getLogger("dlf_bids")


def _say(msg: str) -> None:
    print(f"[{datetime.now():%H:%M:%S}] {msg}", flush=True)


class ProgressReporter:
    """Nipype's status callback: one line per finished node with its elapsed time.

    A module-level class rather than a closure: MultiProc pickles plugin arguments into workers.
    """

    def __init__(self, total: int):
        self.total = total
        self.done = 0
        self.started: dict[str, float] = {}

    def __call__(self, node, status):
        name = node.fullname.replace("dlf_bids_wf.", "")
        if status == "start":
            self.started[name] = time.time()
        elif status in ("end", "exception"):
            self.done += 1
            elapsed = max(0.0, time.time() - self.started.get(name, time.time()))
            verb = "done" if status == "end" else "FAILED"
            _say(f"({self.done}/{self.total}) {verb} {name} ({elapsed:.0f} s)")


def count_jobs(workflow, n_atlases: int) -> int:
    """Jobs nipype will report: identity nodes are pruned; a MapNode reports each item and itself."""
    from nipype.interfaces.utility import IdentityInterface
    from nipype.pipeline.engine import MapNode

    total = 0
    for node in workflow._get_all_nodes():
        if isinstance(node.interface, IdentityInterface):
            continue
        total += n_atlases + 1 if isinstance(node, MapNode) else 1
    return total


def select_inputs(config: Config):
    """Query the dataset and check each T1w and its T2w; bad inputs are reported, not fatal."""
    from ..utils.bids import collect_anatomicals, load_layout

    layout = load_layout(config.bids_dir, config.database_dir)
    collected = collect_anatomicals(layout, config.participant_labels, config.session_labels,
                                    config.bids_filters)
    usable, skipped, warnings = [], list(collected.skipped), []
    for anat in collected.anatomicals:
        try:
            anat, notes = check_input(anat)
        except BadDataError as err:
            skipped.append((anat.subject, str(err)))
            continue
        usable.append(replace(anat, warnings=tuple(notes)))
        warnings += notes
    for warning in warnings:
        print(f"dlf-bids: warning: {warning}", file=sys.stderr)
    for subject, reason in skipped:
        print(f"dlf-bids: skipping sub-{subject}: {reason}", file=sys.stderr)
    if not usable:
        raise BadDataError(f"no usable T1w image among the selected participants "
                           f"({_first_reasons(skipped)})")
    return usable, skipped


def check_memory(config: Config, anatomicals, library) -> None:
    """Refuse, before any work, a run whose largest node alone cannot fit the memory it has."""
    from ..resources import machine_memory_gb, plan_for_run

    limit = config.mem_gb or machine_memory_gb()
    given = f"--mem-gb {config.mem_gb:g}" if config.mem_gb else f"this machine's {limit:.1f} GB"
    for anat in anatomicals:
        node, need = plan_for_run(config, anat.t1w, library).largest
        if need > limit:
            raise ResourceError(f"{anat.t1w.name}: {node} needs about {need:.1f} GB, more than "
                                f"{given}; give the run more memory")


def check_input(anat):
    """``(anat, warnings)``; a bad T1w raises :class:`BadDataError`, a bad T2w is dropped.

    The T2w only helps (DLF's second modality), so losing it must not cost the segmentation.
    """
    from ..utils.images import check_anatomical, check_t2w

    warnings = check_anatomical(anat.t1w)
    if anat.t2w is None:
        return anat, warnings
    try:
        warnings += check_t2w(anat.t2w, anat.t1w)
    except BadDataError as err:
        warnings.append(f"{err}; T2w not used, {anat.t1w.name} is segmented without it")
        return replace(anat, t2w=None), warnings
    return anat, warnings


def _first_reasons(skipped, most: int = 3) -> str:
    """The first few skip reasons, so the error line itself names the files."""
    reasons = [f"sub-{subject}: {reason}" for subject, reason in skipped[:most]]
    if len(skipped) > most:
        reasons.append(f"{len(skipped) - most} more above")
    return "; ".join(reasons)


def _configure_nipype(config: Config) -> Path:
    from ..execution import configure_nipype

    log_dir = config.output_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    configure_nipype(log_dir, config.verbose, stop_on_first_crash=config.stop_on_first_crash,
                     remove_unnecessary_outputs=False)
    return log_dir


def expected_outputs(config: Config, anat) -> dict[str, Path]:
    """Every file the graph writes for this T1w: native segmentations by method, then (with
    --output-spaces) the template-space ones and transforms, so a failure there is reported."""
    from ..interfaces.bids import derivative_path
    from ..workflows.neuronet import expected_neuronet_outputs
    from ..workflows.spaces import expected_space_outputs

    methods = list(config.fusion) + (["deepatlas"] if config.registration == "deepatlas" else [])
    native = {m: derivative_path(config.output_dir, {"subject": anat.subject, **anat.entities,
                                                     "segmentation": m, "suffix": "dseg"})
              for m in methods}
    return {**native, **expected_space_outputs(config, anat),
            **expected_neuronet_outputs(config, anat)}


def check_deepatlas_model(config: Config):
    """Refuse a DeepAtlas model the registration engine cannot use, before any work."""
    from ..deepatlas_registration import model_info

    info = model_info(config.deepatlas_model)
    if info.reference_image is None:
        raise BadDataError(f"DeepAtlas model {config.deepatlas_model} has no reference grid: "
                           "train it with dlf-bids-train-deepatlas")
    if tuple(info.modalities) not in (("T1w",), ("T1w", "T2w")):
        raise BadDataError(f"DeepAtlas model {config.deepatlas_model} takes "
                           f"{'+'.join(info.modalities)}; the registration engine takes T1w or "
                           "T1w+T2w models")
    _say(f"DeepAtlas model {config.deepatlas_model.name} ({'+'.join(info.modalities)}, "
         f"{len(info.labels)} labels, {info.voxel_size:g} mm grid; sha256 {info.sha256[:12]})")
    return info


def deepatlas_label_table(info):
    """The segmentation network's labels as a look-up table (for ``seg-deepatlas``)."""
    from ..utils.labels import Label, LabelTable

    return LabelTable(tuple(Label(int(d["index"]), str(d.get("name") or d["index"]),
                                  str(d.get("abbreviation") or ""), str(d.get("color") or ""))
                            for d in info.labels))


def check_dlf_model(config: Config, library):
    """Refuse a model that cannot segment with this library before any work is done."""
    from ..execution import torch_without_thread_pool
    from ..models.model_file import check_model_fits, load_model

    with torch_without_thread_pool():
        _, info = load_model(config.dlf_model)
    modalities = ["T1w"] + (["T2w"] if library.has_t2w else [])
    plan = check_model_fits(info, library.labels.indices, modalities, force=config.dlf_force)
    _say(f"DLF model {config.dlf_model.name} ({', '.join(info.modalities)}"
         f"{', ModAug' if info.modaug else ''}; sha256 {info.sha256[:12]})")
    for warning in getattr(plan, "warnings", []):
        print(f"dlf-bids: warning: {warning}", file=sys.stderr)
    return info


def check_tissue_model(config: Config):
    """Read the NeuroNet model before any work (a bad file: exit 65); absent: one info line."""
    if config.tissue_model is None:
        _say("NeuroNet tissue segmentation: not run (no --tissue-model)")
        return None
    from ..neuronet_segmentation import model_outputs

    outputs = model_outputs(str(config.tissue_model))  # guards torch's thread pool itself
    methods = set(config.fusion) | ({"deepatlas"} if config.registration == "deepatlas" else set())
    clash = sorted(set(outputs.other_protocols) & methods)
    if clash:
        raise UsageError(f"tissue model protocol(s) {', '.join(clash)} have the name of a fusion "
                         "method: both would write the same seg-<name> files")
    written = (["dseg + GM/WM/CSF probseg"] if outputs.tissue_protocol else []) + \
        [f"seg-{p}" for p in outputs.other_protocols]
    _say(f"NeuroNet model {config.tissue_model.name} ({', '.join(written)}; "
         f"sha256 {outputs.sha256[:12]})")
    return outputs


def write_neuronet_luts(output_dir: Path, outputs) -> None:
    """Root look-up tables: ``dseg.tsv`` for the tissue dseg, ``seg-<protocol>_dseg.tsv`` else."""
    from ..utils.derivatives import lut_path
    from ..utils.labels import write_label_table

    if outputs.tissue_protocol is not None:
        write_label_table(outputs.luts[outputs.tissue_protocol], output_dir / "dseg.tsv")
    for protocol in outputs.other_protocols:
        write_label_table(outputs.luts[protocol], lut_path(output_dir, protocol))


def run_reports_only(config: Config) -> int:
    """``--reports-only``: the reports and citations again, from what the output dir holds."""
    from ..errors import EXIT_OK
    from ..reports.report import write_reports
    from ..utils.bids import strip_prefix

    if config.analysis_level != "participant":
        raise UsageError("--reports-only rebuilds the participant reports: use it with the "
                         "participant level")
    for report in write_reports(config.output_dir, config.bids_dir,
                                strip_prefix(config.participant_labels, "sub-")):
        _say(f"report: {report}")
    return EXIT_OK


def run_participant_level(config: Config, validate_input) -> int:
    from ..utils.atlas_library import load_atlas_library
    from ..workflows.base import t2w_users
    from ..utils.derivatives import (write_bidsignore, write_dataset_description, write_method_luts,
                                     write_readme)

    if config.atlas_dir is None:
        raise UsageError("--atlas-dir is required at the participant level")
    validate_input(config)
    library = load_atlas_library(config.atlas_dir)
    model_info = check_dlf_model(config, library) if "dlf" in config.fusion else None
    deepatlas_info = check_deepatlas_model(config) if config.registration == "deepatlas" else None
    neuronet = check_tissue_model(config)
    anatomicals, skipped = select_inputs(config)
    check_memory(config, anatomicals, library)
    _say(f"{len(anatomicals)} T1w image(s) to segment with {len(library.atlases)} atlases "
         f"({', '.join(config.fusion)}); {config.nprocs} process(es)")
    for space in config.output_spaces:
        _say(f"  also in {space}: {space.t1w} (brain mask: {space.mask or 'none'})")
    users = t2w_users(config, library)
    for anat in anatomicals:
        t2 = ""
        if anat.t2w:
            t2 = (f", T2w {anat.t2w.name} (used by {', '.join(users)})" if users else
                  f", T2w {anat.t2w.name} (not used: no model of this run has a T2w channel)")
        _say(f"  sub-{anat.subject}: {anat.t1w.name}{t2}")

    config.output_dir.mkdir(parents=True, exist_ok=True)
    write_dataset_description(config.output_dir, config.bids_dir, config.atlas_dir,
                              config.templateflow_home)
    write_bidsignore(config.output_dir)
    write_readme(config.output_dir)
    write_method_luts(config.output_dir, config.fusion, library.labels)
    if deepatlas_info is not None:
        write_method_luts(config.output_dir, ["deepatlas"], deepatlas_label_table(deepatlas_info))
    if neuronet is not None:
        write_neuronet_luts(config.output_dir, neuronet)
    log_dir = _configure_nipype(config)

    from ..execution import plugin_settings
    from .summary import summarise
    from ..workflows.base import init_dlf_bids_wf  # imports niworkflows: seconds, so only now

    workflow = init_dlf_bids_wf(config, anatomicals, library)
    n_nodes = count_jobs(workflow, len(library.atlases))
    plugin, plugin_args = plugin_settings(config.plugin, config.plugin_args, config.nprocs,
                                          config.mem_gb, ProgressReporter(n_nodes))
    if plugin != "MultiProc":
        _say(f"running the graph with Nipype's {plugin} plugin")
    started = time.time()
    try:
        workflow.run(plugin=plugin, plugin_args=plugin_args)
    except RuntimeError as err:
        LOG.debug("workflow error: %s", err)
    return summarise(config, anatomicals, skipped, started, log_dir, library, model_info,
                     deepatlas_info)
