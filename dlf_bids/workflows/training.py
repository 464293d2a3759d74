"""Registrations DLF training needs: each atlas in turn is the target, the others are registered
to it with the participant level's own registration node (cached in the work dir)."""

from __future__ import annotations

from pathlib import Path

from nipype.pipeline import engine as pe

from ..interfaces.registration import CoregisterT2w
from ..utils.atlas_library import AtlasLibrary
from .multiatlas import init_register_atlases_node


def init_dlf_training_registration_wf(library: AtlasLibrary, work_dir: Path, preset: str,
                                      seed: int, use_t2w: bool):
    """One ``target_<id>_wf`` per atlas, holding ``register_atlases`` (the other atlases) and,
    with T2w, ``coregister_t2w`` (the target's T2w onto its T1w grid)."""
    workflow = pe.Workflow(name="dlf_training_wf")
    workflow.base_dir = str(work_dir)
    for target in library.atlases:
        others = [a for a in library.atlases if a.atlas_id != target.atlas_id]
        target_wf = pe.Workflow(name=f"target_{target.atlas_id}_wf")
        register = init_register_atlases_node(others, preset, seed, 1, use_t2w)
        register.inputs.target_t1w = str(target.t1w)
        target_wf.add_nodes([register])
        if use_t2w:
            coregister = pe.Node(CoregisterT2w(t1w=str(target.t1w), t2w=str(target.t2w), seed=seed),
                                 name="coregister_t2w")
            target_wf.add_nodes([coregister])
        workflow.add_nodes([target_wf])
    return workflow


def init_deepatlas_alignment_wf(labelled, unlabelled, reference_source: Path, voxel_size: float,
                                work_dir: Path, seed: int):
    """DeepAtlas training inputs: the reference grid (``make_reference``), then every image
    aligned to it (labelled ones with their label maps), one map item per image, cached in the
    work dir. ``labelled``: ``(t1w, dseg)`` pairs; ``unlabelled``: T1w files."""
    from ..interfaces.deepatlas import AlignToReference, MakeReferenceGrid

    workflow = pe.Workflow(name="deepatlas_training_wf")
    workflow.base_dir = str(work_dir)
    make_reference = pe.Node(MakeReferenceGrid(in_file=str(reference_source), voxel_size=voxel_size),
                             name="make_reference")
    align_labelled = pe.MapNode(AlignToReference(seed=seed), iterfield=["in_file", "labels"],
                                name="align_labelled")
    align_labelled.inputs.in_file = [str(t1w) for t1w, _ in labelled]
    align_labelled.inputs.labels = [str(dseg) for _, dseg in labelled]
    workflow.connect(make_reference, "out_file", align_labelled, "reference")
    if unlabelled:
        align_unlabelled = pe.MapNode(AlignToReference(seed=seed), iterfield=["in_file"],
                                      name="align_unlabelled")
        align_unlabelled.inputs.in_file = [str(t1w) for t1w in unlabelled]
        workflow.connect(make_reference, "out_file", align_unlabelled, "reference")
    return workflow
