"""Nipype interfaces for what the report needs from the work dir: the atlas-registration check.

The registered atlas images exist only in the work dir, so the check figure is drawn during the
run (:class:`RegistrationCheck`, cached like any node) and copied into the output dir by
:class:`PublishFigure`, which runs every time: a figure deleted from the output dir comes back on
a rerun even when the drawing node is cached.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from nipype.interfaces.base import (BaseInterfaceInputSpec, File, InputMultiObject,
                                    SimpleInterface, Str, TraitedSpec)

from ..utils.files import atomic_open


class _RegistrationCheckInputSpec(BaseInterfaceInputSpec):
    subject_t1w = File(exists=True, mandatory=True, desc="the subject's T1w (the fixed image)")
    atlas_t1w = File(exists=True, mandatory=True, desc="the atlas T1w as in the library")
    warped_atlas_t1w = InputMultiObject(File(exists=True), mandatory=True,
                                        desc="registered atlas T1w images; the first is shown, "
                                             "and must be the same atlas as atlas_t1w")
    atlas_name = Str("atlas", usedefault=True, desc="the atlas's name in the figure's titles")


class _RegistrationCheckOutputSpec(TraitedSpec):
    out_report = File(exists=True, desc="the before/after figure (SVG)")


class RegistrationCheck(SimpleInterface):
    """Draw the atlas before and after registration with the subject's T1w edges."""

    input_spec = _RegistrationCheckInputSpec
    output_spec = _RegistrationCheckOutputSpec

    def _run_interface(self, runtime):
        from ..reports.figures import plot_registration_check

        out = plot_registration_check(self.inputs.subject_t1w, self.inputs.atlas_t1w,
                                      self.inputs.warped_atlas_t1w[0],
                                      Path(runtime.cwd) / "registration_check.svg",
                                      atlas_name=self.inputs.atlas_name)
        self._results["out_report"] = str(out)
        return runtime


class _PublishFigureInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="the figure in the work dir")
    out_path = Str(mandatory=True, desc="its absolute path in the output dir")


class _PublishFigureOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="the published figure")


class PublishFigure(SimpleInterface):
    """Copy a figure into the output dir atomically (a temporary name, then ``os.replace``)."""

    input_spec = _PublishFigureInputSpec
    output_spec = _PublishFigureOutputSpec
    _always_run = True  # cheap, and the output-dir copy may have been removed since the last run

    def _run_interface(self, runtime):
        dest = Path(self.inputs.out_path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        with open(self.inputs.in_file, "rb") as src, atomic_open(dest, binary=True) as dst:
            shutil.copyfileobj(src, dst)
        self._results["out_file"] = str(dest)
        return runtime
