"""Multi-atlas segmentation: register every atlas to the subject, warp its labels, fuse them."""

from __future__ import annotations

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from ..config import Config
from ..interfaces.fusion import JointLabelFusion, MajorityVote
from ..interfaces.registration import RegisterAtlas
from ..utils.atlas_library import AtlasLibrary

FUSION_INTERFACES = {"mv": MajorityVote, "jlf": JointLabelFusion}


def init_multiatlas_wf(config: Config, library: AtlasLibrary, name: str = "multiatlas_wf"):
    """Build the registration + fusion workflow for one T1w image.

    Inputs
    ------
    t1w
        the subject's T1w image (header-validated); defines the output grid

    Outputs
    -------
    warped_t1w, warped_dseg
        every atlas's image and labels on the subject's grid (for later fusion methods)
    seg_<method>
        one fused label map per method in ``config.fusion``
    """
    workflow = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(fields=["t1w"]), name="inputnode")
    outputnode = pe.Node(
        niu.IdentityInterface(fields=["warped_t1w", "warped_dseg"]
                              + [f"seg_{m}" for m in config.fusion]),
        name="outputnode",
    )
    threads = config.threads_per_process

    # One registration per atlas; MultiProc runs the map's items in parallel.
    register = pe.MapNode(
        RegisterAtlas(preset=config.registration_preset, seed=config.seed,
                      num_threads=config.registration_threads),
        iterfield=["atlas_t1w", "atlas_dseg"],
        name="register_atlases",
        n_procs=config.registration_threads,
        mem_gb=2.0,
    )
    register.inputs.atlas_t1w = [str(a.t1w) for a in library.atlases]
    register.inputs.atlas_dseg = [str(a.dseg) for a in library.atlases]

    workflow.connect([
        (inputnode, register, [("t1w", "target_t1w")]),
        (register, outputnode, [("warped_t1w", "warped_t1w"), ("warped_dseg", "warped_dseg")]),
    ])

    for method in config.fusion:
        fuse = pe.Node(FUSION_INTERFACES[method](), name=f"fuse_{method}", mem_gb=4.0)
        if method == "jlf":
            fuse.inputs.num_threads = threads
            fuse.n_procs = threads
            workflow.connect(register, "warped_t1w", fuse, "atlas_t1w")
        workflow.connect([
            (inputnode, fuse, [("t1w", "target_t1w")]),
            (register, fuse, [("warped_dseg", "atlas_dseg")]),
            (fuse, outputnode, [("out_dseg", f"seg_{method}")]),
        ])
    return workflow
