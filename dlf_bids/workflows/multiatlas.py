"""Multi-atlas segmentation: register every atlas to the subject, warp its labels, fuse them."""

from __future__ import annotations

import functools

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from ..config import Config
from ..interfaces.deepatlas import AlignToReference, RegisterAtlasDeepAtlas, SegmentDeepAtlas
from ..interfaces.fusion import DeepLabelFusion, JointLabelFusion, MajorityVote
from ..interfaces.registration import RegisterAtlas
from ..resources import MemoryPlan
from ..utils.atlas_library import AtlasLibrary

FUSION_INTERFACES = {"mv": MajorityVote, "jlf": JointLabelFusion, "dlf": DeepLabelFusion}


@functools.lru_cache(maxsize=8)
def _model_modalities(model_file: str) -> tuple[str, ...]:
    """The model's input modalities; cached, since every subject's graph asks (a file read each)."""
    from ..execution import torch_without_thread_pool
    from ..models.model_file import load_model

    with torch_without_thread_pool():  # this process forks the workers later
        return tuple(load_model(model_file)[1].modalities)


def deepatlas_uses_t2w(config: Config) -> bool:
    """Whether the DeepAtlas engine takes T2w images (a T1w + T2w model)."""
    from ..deepatlas_registration import model_info

    return config.registration == "deepatlas" and "T2w" in model_info(config.deepatlas_model).modalities


def dlf_uses_t2w(config: Config, library: AtlasLibrary) -> bool:
    """Whether atlases' T2w must be warped: a DLF model with a T2w channel and a library with T2w."""
    if "dlf" not in config.fusion:
        return False
    return "T2w" in _model_modalities(str(config.dlf_model)) and library.has_t2w


def init_register_atlases_node(atlases, preset: str, seed: int, threads: int, warp_t2w: bool,
                               name: str = "register_atlases",
                               mem_gb: float = 2.0) -> pe.MapNode:
    """One registration per atlas (the participant level and DLF training share this node);
    MultiProc runs the map's items in parallel, ``mem_gb`` each."""
    register = pe.MapNode(
        RegisterAtlas(preset=preset, seed=seed, num_threads=threads),
        iterfield=["atlas_t1w", "atlas_dseg"] + (["atlas_t2w"] if warp_t2w else []),
        name=name, n_procs=threads, mem_gb=mem_gb,
    )
    register.inputs.atlas_t1w = [str(a.t1w) for a in atlases]
    register.inputs.atlas_dseg = [str(a.dseg) for a in atlases]
    if warp_t2w:
        register.inputs.atlas_t2w = [str(a.t2w) for a in atlases]
    return register


def init_align_atlases_node(config: Config, library: AtlasLibrary) -> pe.MapNode:
    """``--registration deepatlas``: every atlas aligned affinely to the model's reference grid,
    once per run (it does not depend on the subject); its outputs feed every image's workflow."""
    with_t2w = deepatlas_uses_t2w(config) and library.has_t2w
    align = pe.MapNode(AlignToReference(model_file=str(config.deepatlas_model), seed=config.seed,
                                        num_threads=config.registration_threads),
                       iterfield=["in_file"] + (["t2w"] if with_t2w else []),
                       name="align_atlases_to_reference", mem_gb=1.0)
    align.inputs.in_file = [str(a.t1w) for a in library.atlases]
    if with_t2w:  # a library without T2w: the model gets noise in that channel
        align.inputs.t2w = [str(a.t2w) for a in library.atlases]
    return align


def _deepatlas_registration(config: Config, library: AtlasLibrary, workflow, inputnode, outputnode,
                            warp_t2w: bool, subject_has_t2w: bool, mem_gb: float) -> pe.MapNode:
    """The DeepAtlas engine: the subject aligned to the reference grid, one network pass per atlas
    (atlas alignments come in through ``inputnode``), and the segmentation network's own output.
    A T1w + T2w model also gets the subject's T2w (already on its T1w grid) and the atlases' T2w
    on the reference grid, where they exist (noise stands in otherwise)."""
    align = pe.Node(AlignToReference(model_file=str(config.deepatlas_model), seed=config.seed,
                                     num_threads=config.registration_threads,
                                     t2w_on_image_grid=True),
                    name="align_t1w_to_reference", mem_gb=mem_gb)
    iterfield = ["atlas_t1w", "atlas_dseg", "atlas_transform", "atlas_on_reference"]
    network_t2w = deepatlas_uses_t2w(config)
    if network_t2w and library.has_t2w:
        iterfield.append("atlas_t2w_on_reference")
        if warp_t2w:  # the run's alignment registered each atlas T2w to its T1w: reused
            iterfield.append("atlas_t2w_to_t1w")
    register = pe.MapNode(
        RegisterAtlasDeepAtlas(model_file=str(config.deepatlas_model), device=config.device,
                               seed=config.seed, num_threads=config.registration_threads,
                               refine_steps=config.deepatlas_refine_steps),
        iterfield=iterfield + (["atlas_t2w"] if warp_t2w else []), name="register_atlases",
        mem_gb=mem_gb)
    register.inputs.atlas_t1w = [str(a.t1w) for a in library.atlases]
    register.inputs.atlas_dseg = [str(a.dseg) for a in library.atlases]
    if warp_t2w:
        register.inputs.atlas_t2w = [str(a.t2w) for a in library.atlases]
    segment = pe.Node(SegmentDeepAtlas(model_file=str(config.deepatlas_model), device=config.device,
                                       seed=config.seed),
                      name="segment_deepatlas", mem_gb=mem_gb)
    to_register = [("transform", "target_transform"), ("on_reference", "target_on_reference"),
                   ("reference", "reference")]
    workflow.connect([
        (inputnode, align, [("t1w", "in_file")]),
        (inputnode, register, [("atlas_transforms", "atlas_transform"),
                               ("atlas_on_reference", "atlas_on_reference")]),
        (align, register, to_register),
        (inputnode, segment, [("t1w", "target_t1w")]),
        (align, segment, to_register[:2]),
        (register, outputnode, [("composite", "atlas_xfms"), ("xfm_metadata", "atlas_xfm_metadata")]),
        (segment, outputnode, [("out_dseg", "seg_deepatlas")]),
    ])
    for field in ("atlas_t2w_on_reference", "atlas_t2w_to_t1w"):
        if field in iterfield:
            workflow.connect(inputnode, field, register, field)
    if network_t2w and subject_has_t2w:
        workflow.connect([(inputnode, align, [("t2w", "t2w")]),
                          (align, register, [("t2w_on_reference", "target_t2w_on_reference")]),
                          (align, segment, [("t2w_on_reference", "target_t2w_on_reference")])])
    return register


def init_multiatlas_wf(config: Config, library: AtlasLibrary, name: str = "multiatlas_wf",
                       subject_has_t2w: bool = False, *, memory: MemoryPlan):
    """Build the registration + fusion workflow for one T1w image.

    ``memory`` (:func:`dlf_bids.resources.plan_for_run` of this T1w) sets each node's ``mem_gb``,
    which MultiProc schedules by.

    Inputs
    ------
    t1w
        the subject's T1w image (header-validated); defines the output grid
    t2w
        the subject's T2w on the T1w grid (used by DLF and DeepAtlas models with a T2w channel)
    atlas_transforms, atlas_on_reference, atlas_t2w_on_reference, atlas_t2w_to_t1w
        ``--registration deepatlas`` only: the atlases aligned to the model's reference grid
        (:func:`init_align_atlases_node`; for a T1w + T2w model their T2w, and the T2w -> T1w
        rigid transforms that DLF's warped atlas T2w then reuse)

    Outputs
    -------
    warped_t1w, warped_dseg
        every atlas's image and labels on the subject's grid (for later fusion methods)
    seg_<method>
        one fused label map per method in ``config.fusion``
    seg_deepatlas, atlas_xfms, atlas_xfm_metadata
        ``--registration deepatlas`` only: the segmentation network's label map, and each atlas's
        atlas -> subject transform (ANTs composite ``.h5``) with its sidecar (smallest Jacobian
        determinant of the warp)
    """
    workflow = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(fields=["t1w", "t2w", "atlas_transforms",
                                                      "atlas_on_reference", "atlas_t2w_on_reference",
                                                      "atlas_t2w_to_t1w"]), name="inputnode")
    outputnode = pe.Node(
        niu.IdentityInterface(fields=["warped_t1w", "warped_dseg", "uncertainty_dlf", "metadata_dlf",
                                      "probseg_dlf", "probseg_metadata_dlf", "seg_deepatlas",
                                      "atlas_xfms", "atlas_xfm_metadata"]
                              + [f"seg_{m}" for m in config.fusion]),
        name="outputnode",
    )
    warp_t2w = dlf_uses_t2w(config, library)
    threads = config.threads_per_process

    if config.registration == "deepatlas":
        register = _deepatlas_registration(config, library, workflow, inputnode, outputnode, warp_t2w,
                                           subject_has_t2w, memory.deepatlas)
    else:
        register = init_register_atlases_node(library.atlases, config.registration_preset,
                                              config.seed, config.registration_threads, warp_t2w,
                                              mem_gb=memory.registration)

    workflow.connect([
        (inputnode, register, [("t1w", "target_t1w")]),
        (register, outputnode, [("warped_t1w", "warped_t1w"), ("warped_dseg", "warped_dseg")]),
    ])

    for method in config.fusion:
        fuse = pe.Node(FUSION_INTERFACES[method](), name=f"fuse_{method}",
                       mem_gb=memory.fusion[method])
        if method in ("jlf", "dlf"):
            fuse.inputs.num_threads = threads
            fuse.n_procs = threads
            workflow.connect(register, "warped_t1w", fuse, "atlas_t1w")
        if method == "dlf":
            fuse.inputs.model_file = str(config.dlf_model)
            fuse.inputs.device = config.device
            fuse.inputs.atlas_batch = config.atlas_batch
            fuse.inputs.force = config.dlf_force
            fuse.inputs.seed = config.seed
            fuse.inputs.write_probseg = config.dlf_probseg
            if config.dlf_probseg:
                workflow.connect([(fuse, outputnode, [("out_probseg", "probseg_dlf"),
                                                      ("probseg_metadata", "probseg_metadata_dlf")])])
            if warp_t2w and subject_has_t2w:
                workflow.connect([(register, fuse, [("warped_t2w", "atlas_t2w")]),
                                  (inputnode, fuse, [("t2w", "target_t2w")])])
            workflow.connect([(fuse, outputnode, [("out_uncertainty", "uncertainty_dlf"),
                                                  ("metadata", "metadata_dlf")])])
        workflow.connect([
            (inputnode, fuse, [("t1w", "target_t1w")]),
            (register, fuse, [("warped_dseg", "atlas_dseg")]),
            (fuse, outputnode, [("out_dseg", f"seg_{method}")]),
        ])
    return workflow
