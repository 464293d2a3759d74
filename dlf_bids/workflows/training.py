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
