"""NeuroNet's teachers as Nipype workflows: from a raw T1w, the label map of every protocol.

Per image (``case_<id>_wf``): the atlas library is registered to the image with the participant
level's own registration node (so a run of the teachers and a later participant run share the
work dir's cache), the warped labels are fused (``mv`` or ``jlf``) for ``multiatlas`` protocols,
their union grown by 3 mm is the brain mask of Atropos for ``atropos`` protocols, and
``reference`` protocols read the label map that comes with the image. One ``labels_<protocol>`` node per protocol then
makes the protocol's label map from its source (as is, or collapsed): which nodes exist follows
from the protocol specs alone, so a new protocol is a spec, not code.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from ..interfaces.registration import CoregisterT2w
from ..interfaces.teachers import AtroposTissue, BrainMaskFromLabels, ProtocolLabels
from .multiatlas import FUSION_INTERFACES, init_register_atlases_node


@dataclass(frozen=True)
class TeacherCase:
    """One training image: its id, raw T1w, the atlases registered to it, for ``reference``
    protocols the label map that comes with it, and its T2w (any grid) for T1w + T2w models."""

    case_id: str
    t1w: Path
    atlases: tuple = ()
    reference: Path | None = None
    t2w: Path | None = None


def init_teachers_wf(case: TeacherCase, protocols, preset: str = "quick", seed: int = 0,
                     fusion: str = "mv", name: str | None = None):
    """The teacher workflow of one image; ``outputnode.labels_<protocol>`` per protocol, and a
    ``coregister_t2w`` node (the T2w on the T1w grid, the network's second input) when the case
    has a T2w."""
    sources = {p.recipe.source for p in protocols}
    if sources & {"multiatlas", "atropos"} and len(case.atlases) < 1:
        raise ValueError(f"case {case.case_id}: multi-atlas and Atropos teachers need atlases")
    workflow = pe.Workflow(name=name or f"case_{case.case_id}_wf")
    inputnode = pe.Node(niu.IdentityInterface(fields=["t1w"]), name="inputnode")
    inputnode.inputs.t1w = str(case.t1w)
    outputnode = pe.Node(niu.IdentityInterface(fields=[f"labels_{p.name}" for p in protocols]),
                         name="outputnode")
    source_of = {}
    if sources & {"multiatlas", "atropos"}:
        register = init_register_atlases_node(case.atlases, preset, seed, 1, warp_t2w=False)
        workflow.connect(inputnode, "t1w", register, "target_t1w")
    if "multiatlas" in sources:
        fuse = pe.Node(FUSION_INTERFACES[fusion](), name=f"fuse_{fusion}")
        workflow.connect([(inputnode, fuse, [("t1w", "target_t1w")]),
                          (register, fuse, [("warped_dseg", "atlas_dseg")])])
        if fusion == "jlf":
            workflow.connect(register, "warped_t1w", fuse, "atlas_t1w")
        source_of["multiatlas"] = (fuse, "out_dseg")
    if "atropos" in sources:
        mask = pe.Node(BrainMaskFromLabels(), name="brain_mask")
        workflow.connect(register, "warped_dseg", mask, "atlas_dseg")
        # one Atropos run per class count the protocols ask for (the built-in: 3)
        for n in sorted({p.recipe.atropos_classes for p in protocols if p.recipe.source == "atropos"}):
            atropos = pe.Node(AtroposTissue(n_classes=n), name=f"atropos_k{n}")
            workflow.connect([(inputnode, atropos, [("t1w", "t1w")]),
                              (mask, atropos, [("out_mask", "mask")])])
            source_of[f"atropos_k{n}"] = (atropos, "out_classes")
    if case.t2w is not None:
        coregister = pe.Node(CoregisterT2w(t2w=str(case.t2w), seed=seed), name="coregister_t2w")
        workflow.connect(inputnode, "t1w", coregister, "t1w")
    for protocol in protocols:
        labels = pe.Node(ProtocolLabels(protocol=protocol.to_dict()), name=f"labels_{protocol.name}")
        workflow.connect(inputnode, "t1w", labels, "reference")
        if protocol.recipe.source == "reference":
            if case.reference is None:
                raise ValueError(f"case {case.case_id} has no label map of its own for "
                                 f"protocol {protocol.name}")
            labels.inputs.source = str(case.reference)
        else:
            key = protocol.recipe.source
            if key == "atropos":
                key = f"atropos_k{protocol.recipe.atropos_classes}"
            node, field = source_of[key]
            workflow.connect(node, field, labels, "source")
        workflow.connect(labels, "out_labels", outputnode, f"labels_{protocol.name}")
    return workflow


def init_neuronet_teachers_wf(cases, protocols, work_dir: Path, preset: str = "quick",
                              seed: int = 0, fusion: str = "mv"):
    """All training images' teachers in one graph (MultiProc runs the images in parallel)."""
    workflow = pe.Workflow(name="neuronet_teachers_wf")
    workflow.base_dir = str(work_dir)
    workflow.add_nodes([init_teachers_wf(c, protocols, preset, seed, fusion) for c in cases])
    return workflow


def collect_teacher_labels(exec_graph, protocols) -> dict[str, dict[str, Path]]:
    """``{case id: {protocol: label map}}`` from a finished teachers graph."""
    found: dict[str, dict[str, Path]] = {}
    for p in protocols:
        for case, path in collect_case_outputs(exec_graph, f"labels_{p.name}", "out_labels").items():
            found.setdefault(case, {})[p.name] = path
    return found


def collect_case_outputs(exec_graph, node_name: str, field: str) -> dict[str, Path]:
    """``{case id: file}``: the ``field`` output of every case's ``node_name`` node."""
    found = {}
    for node in exec_graph.nodes():
        case = next((p[len("case_"):-len("_wf")] for p in node.fullname.split(".")
                     if p.startswith("case_") and p.endswith("_wf")), None)
        if case is not None and node.name == node_name:
            found[case] = Path(getattr(node.result.outputs, field))
    return found
