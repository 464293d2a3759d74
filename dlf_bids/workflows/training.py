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
    aligned to it (labelled ones with their label maps, any with its T2w), cached in the work
    dir. ``labelled``: ``(t1w, dseg, t2w or None)``; ``unlabelled``: ``(t1w, t2w or None)``.
    One node per image (``align_labelled<k>``, ``align_unlabelled<k>``): a T2w that only some
    images have is not something a MapNode's iterfields can say."""
    from ..interfaces.deepatlas import AlignToReference, MakeReferenceGrid

    workflow = pe.Workflow(name="deepatlas_training_wf")
    workflow.base_dir = str(work_dir)
    make_reference = pe.Node(MakeReferenceGrid(in_file=str(reference_source), voxel_size=voxel_size),
                             name="make_reference")
    images = [(f"align_labelled{k}", t1w, dseg, t2w) for k, (t1w, dseg, t2w) in enumerate(labelled)]
    images += [(f"align_unlabelled{k}", t1w, None, t2w) for k, (t1w, t2w) in enumerate(unlabelled)]
    for name, t1w, dseg, t2w in images:
        align = pe.Node(AlignToReference(seed=seed, in_file=str(t1w)), name=name)
        if dseg is not None:
            align.inputs.labels = str(dseg)
        if t2w is not None:
            align.inputs.t2w = str(t2w)
        workflow.connect(make_reference, "out_file", align, "reference")
    return workflow
