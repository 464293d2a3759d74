"""The methods text of a run and the references it cites: ``logs/CITATION.md`` and ``.bib``.

The text is built from the status records, so it names only what the run really did (fusion
methods, atlases, registration preset, DLF model and whether a T2w was used) and cites only the
papers and tools behind those steps, as fMRIPrep's boilerplate does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..fusion import FUSION_METHODS
from ..registration import REGISTRATION_PRESETS
from ..run_status import RunStatus
from ..utils.files import write_text_atomic


@dataclass(frozen=True)
class Reference:
    """One paper or tool; the Markdown entry and the BibTeX entry are both made from it."""

    kind: str  # BibTeX entry type: article, inproceedings or misc
    authors: tuple[str, ...]  # "Last, Given" as BibTeX wants them
    title: str  # BibTeX braces keep capitals ({BIDS}); the Markdown entry drops them
    venue: str = ""  # journal (article), booktitle (inproceedings)
    year: str = ""
    volume: str = ""
    number: str = ""
    pages: str = ""
    doi: str = ""
    url: str = ""
    more_authors: bool = True  # the list is the first authors only ("and others", "et al.")
    cite_as: str = ""  # the in-text citation when "First et al., year" does not fit

    @property
    def cite(self) -> str:
        if self.cite_as:
            return self.cite_as
        last = self.authors[0].split(",")[0]
        if len(self.authors) == 1 and not self.more_authors:
            return f"{last}, {self.year}"
        return f"{last} et al., {self.year}"

    @property
    def text(self) -> str:
        """The reference list entry (Markdown): ``Avants BB, ... *Journal* 12(1):26-41, 2008.``"""
        names = ", ".join(_short_name(a) for a in self.authors)
        names += ", et al." if self.more_authors else "."
        pages = self.pages.replace("--", "-")
        issue = f"({self.number})" if self.number else ""
        place = f"{self.volume}{issue}:{pages}" if self.volume else pages
        where = f"*{self.venue}* {place}, {self.year}." if self.venue else "Software."
        link = f" https://doi.org/{self.doi}" if self.doi else (f" {self.url}" if self.url else "")
        return f"{names} {_plain(self.title)}. {where}{link}"

    def bibtex(self, key: str) -> str:
        venue = {"article": "journal", "inproceedings": "booktitle"}.get(self.kind)
        authors = " and ".join(self.authors) + (" and others" if self.more_authors else "")
        fields = [("author", authors), ("title", self.title), (venue, self.venue),
                  ("volume", self.volume), ("number", self.number), ("pages", self.pages),
                  ("year", self.year), ("doi", self.doi),
                  ("howpublished", f"\\url{{{self.url}}}" if self.url else "")]
        body = ",\n".join(f"  {name} = {{{value}}}" for name, value in fields if name and value)
        return f"@{self.kind}{{{key},\n{body}\n}}"


def _short_name(author: str) -> str:
    """"Avants, Brian B." -> "Avants BB"; "de la Vega, Alejandro" -> "de la Vega A"."""
    last, _, given = author.partition(", ")
    return f"{last} {''.join(part[0] for part in re.split(r'[ .-]+', given) if part)}"


def _plain(title: str) -> str:
    return title.replace("{", "").replace("}", "")


REFERENCES = {
    "bids": Reference(
        "article", ("Gorgolewski, Krzysztof J.", "Auer, Tibor", "Calhoun, Vince D."),
        "The brain imaging data structure, a format for organizing and describing outputs of "
        "neuroimaging experiments", "Scientific Data", "2016", "3", pages="160044",
        doi="10.1038/sdata.2016.44"),
    "bidsapps": Reference(
        "article", ("Gorgolewski, Krzysztof J.", "Alfaro-Almagro, Fidel", "Auer, Tibor"),
        "{BIDS} apps: Improving ease of use, accessibility, and reproducibility of neuroimaging "
        "data analysis methods", "PLoS Computational Biology", "2017", "13", "3", "e1005209",
        "10.1371/journal.pcbi.1005209"),
    "nipype": Reference(
        "article", ("Gorgolewski, Krzysztof", "Burns, Christopher D.", "Madison, Cindee",
                    "Clark, Dav", "Halchenko, Yaroslav O.", "Waskom, Michael L.",
                    "Ghosh, Satrajit S."),
        "Nipype: a flexible, lightweight and extensible neuroimaging data processing framework "
        "in {P}ython", "Frontiers in Neuroinformatics", "2011", "5", pages="13",
        doi="10.3389/fninf.2011.00013", more_authors=False),
    "pybids": Reference(
        "article", ("Yarkoni, Tal", "Markiewicz, Christopher J.", "de la Vega, Alejandro"),
        "{PyBIDS}: {P}ython tools for {BIDS} datasets", "Journal of Open Source Software",
        "2019", "4", "40", "1294", "10.21105/joss.01294"),
    "niworkflows": Reference(
        "misc", ("Esteban, Oscar", "Markiewicz, Christopher J.", "Goncalves, Mathias",
                 "Blair, Ross"),
        "{NiWorkflows}: {N}euro{I}maging Workflows", url="https://github.com/nipreps/niworkflows",
        cite_as="Esteban et al., NiWorkflows"),
    "avants2008": Reference(
        "article", ("Avants, Brian B.", "Epstein, Charles L.", "Grossman, Murray",
                    "Gee, James C."),
        "Symmetric diffeomorphic image registration with cross-correlation: evaluating "
        "automated labeling of elderly and neurodegenerative brain", "Medical Image Analysis",
        "2008", "12", "1", "26--41", "10.1016/j.media.2007.06.004", more_authors=False),
    "antsx": Reference(
        "article", ("Tustison, Nicholas J.", "Cook, Philip A.", "Holbrook, Andrew J."),
        "The {ANTsX} ecosystem for quantitative biological and medical imaging",
        "Scientific Reports", "2021", "11", pages="9068", doi="10.1038/s41598-021-87564-6"),
    "heckemann2006": Reference(
        "article", ("Heckemann, Rolf A.", "Hajnal, Joseph V.", "Aljabar, Paul",
                    "Rueckert, Daniel", "Hammers, Alexander"),
        "Automatic anatomical brain {MRI} segmentation combining label propagation and decision "
        "fusion", "NeuroImage", "2006", "33", "1", "115--126",
        "10.1016/j.neuroimage.2006.05.061", more_authors=False),
    "wang2013": Reference(
        "article", ("Wang, Hongzhi", "Suh, Jung W.", "Das, Sandhitsu R.", "Pluta, John B.",
                    "Craige, Caryne", "Yushkevich, Paul A."),
        "Multi-atlas segmentation with joint label fusion",
        "IEEE Transactions on Pattern Analysis and Machine Intelligence", "2013", "35", "3",
        "611--623", "10.1109/TPAMI.2012.143", more_authors=False),
    "xu2019": Reference(
        "inproceedings", ("Xu, Zhenlin", "Niethammer, Marc"),
        "{DeepAtlas}: Joint semi-supervised learning of image registration and segmentation",
        "Medical Image Computing and Computer Assisted Intervention (MICCAI)", "2019",
        pages="420--429", doi="10.1007/978-3-030-32245-8_47", url="https://arxiv.org/abs/1904.08465",
        more_authors=False),
    "xie2023": Reference(
        "article", ("Xie, Long", "Wisse, Laura E. M.", "Wang, Jiancong", "Ravikumar, Sadhana",
                    "Khandelwal, Pulkit", "Glenn, Trevor", "Luther, Anica", "Lim, Sydney",
                    "Wolk, David A.", "Yushkevich, Paul A."),
        "Deep label fusion: A generalizable hybrid multi-atlas and deep convolutional neural "
        "network for medical image segmentation", "Medical Image Analysis", "2023", "83",
        pages="102683", doi="10.1016/j.media.2022.102683", more_authors=False),
    "pytorch": Reference(
        "inproceedings", ("Paszke, Adam", "Gross, Sam", "Massa, Francisco"),
        "{PyTorch}: An Imperative Style, High-Performance Deep Learning Library",
        "Advances in Neural Information Processing Systems 32", "2019", pages="8024--8035"),
    "rajchl2018": Reference(
        # MIDL 2018; cited by its arXiv record (the proceedings have no pages to cite)
        "article", ("Rajchl, Martin", "Pawlowski, Nick", "Rueckert, Daniel",
                    "Matthews, Paul M.", "Glocker, Ben"),
        "{NeuroNet}: Fast and Robust Reproduction of Multiple Brain Image Segmentation Pipelines",
        "arXiv", "2018", pages="1806.04224", url="https://arxiv.org/abs/1806.04224",
        more_authors=False),
    "nilearn": Reference(
        "article", ("Abraham, Alexandre", "Pedregosa, Fabian", "Eickenberg, Michael"),
        "Machine learning for neuroimaging with scikit-learn", "Frontiers in Neuroinformatics",
        "2014", "8", pages="14", doi="10.3389/fninf.2014.00014"),
}


@dataclass(frozen=True)
class Methods:
    paragraphs: list[str]  # Markdown, citing as "(Author et al., year)"
    keys: list[str]  # the references cited, in order of first citation


def _union(lists) -> list[str]:
    return list(dict.fromkeys(item for items in lists for item in items))


def _version(records: list[RunStatus], package: str) -> str:
    """The package's version as the records give it ("" when none recorded it)."""
    found = _union([[r.packages[package]] for r in records if (r.packages or {}).get(package)])
    return " " + "/".join(found) if found else ""


def methods_of(records: list[RunStatus]) -> Methods:
    """The methods text of the images that were processed (skipped ones did nothing)."""
    ran = [r for r in records if r.status != "skipped"]
    keys: list[str] = []

    def cite(*names: str) -> str:
        keys.extend(n for n in names if n not in keys)
        return "(" + "; ".join(REFERENCES[n].cite for n in names) + ")"

    def v(package: str) -> str:
        return _version(ran, package)

    versions = "/".join(_union([[r.version] for r in ran if r.version])) or "(unknown version)"
    paragraphs = [
        f"Segmentations were produced with dlf-bids {versions}, a BIDS-App {cite('bidsapps')} "
        f"built on Nipype{v('nipype')} {cite('nipype')} and NiWorkflows{v('niworkflows')} "
        f"{cite('niworkflows')}. The T1w images (and any T2w images of the same sessions) were "
        f"found in the BIDS dataset {cite('bids')} with PyBIDS{v('pybids')} {cite('pybids')}."
    ]
    if not ran:
        return Methods(paragraphs, keys)
    atlases = _union(r.atlases for r in ran)
    paragraphs.append(
        f"Each T1w image was segmented in its native space by multi-atlas segmentation with "
        f"{len(atlases)} atlases ({', '.join(atlases)}). " + _registration_sentence(ran, cite, v))
    if any(r.registration == "deepatlas" for r in ran):
        paragraphs.append(
            "The segmentation network trained jointly with the registration network gave its own "
            "label map of each T1w image (`seg-deepatlas`), predicted on the reference grid and "
            "brought back to the T1w grid with generic-label interpolation.")
    methods = [m for m in FUSION_METHODS if m in _union(r.fusion for r in ran)]
    paragraphs += [_fusion_paragraph(m, ran, cite, v) for m in methods]
    paragraphs += _neuronet_paragraph(ran, cite, v)
    paragraphs.append(f"The figures of the reports were made with Nilearn{v('nilearn')} "
                      f"{cite('nilearn')} and NiWorkflows.")
    return Methods(paragraphs, keys)


def _registration_sentence(records: list[RunStatus], cite, v) -> str:
    """How the atlases were registered: ANTs presets, or the DeepAtlas network."""
    sentences = []
    presets = _union([[r.registration_preset] for r in records
                      if r.registration_preset and r.registration != "deepatlas"])
    if presets:
        transforms = ", ".join(f"`{p}` (ANTs `{REGISTRATION_PRESETS.get(p, p)}`)" for p in presets)
        sentences.append(
            f"Every atlas T1w image was registered to the subject's T1w image with the symmetric "
            f"image normalization method of ANTs {cite('avants2008')}, called through "
            f"ANTsPy{v('antspyx')} {cite('antsx')}, with the registration preset {transforms}; the "
            f"atlas labels were then warped onto the T1w grid with generic-label interpolation.")
    models = _union([[f"`{r.deepatlas_model['file']}` (SHA-256 {r.deepatlas_model['sha256']})"]
                     for r in records if r.registration == "deepatlas" and r.deepatlas_model])
    if models:
        sentences.append(
            f"Every atlas T1w image was registered to the subject's T1w image by a DeepAtlas "
            f"registration network {cite('xu2019')} (model {', '.join(models)}, PyTorch"
            f"{v('torch')}): the subject and the atlases were first aligned affinely to the "
            f"model's reference grid with ANTsPy{v('antspyx')} {cite('antsx')}, the network then "
            f"gave a diffeomorphic displacement (scaling and squaring of a stationary velocity "
            f"field) per atlas, and the atlas labels were warped onto the T1w grid through the "
            f"composed transforms with generic-label interpolation.")
        deepatlas = [r for r in records if r.registration == "deepatlas"]
        used = sum("deepatlas" in r.t2w_used_by for r in deepatlas)
        if used:
            which = "The subject's" if used == len(deepatlas) else \
                f"For {used} of {len(deepatlas)} T1w images, the subject's"
            sentences.append(f"{which} T2w image, rigidly registered onto the T1w, was the "
                             f"networks' second input, with the atlases' T2w images.")
    return " ".join(sentences)


def _neuronet_paragraph(records: list[RunStatus], cite, v) -> list[str]:
    """NeuroNet's paragraph when the run used a tissue model (else none)."""
    runs = [r.tissue_model for r in records if r.tissue_model]
    if not runs:
        return []
    models = _union([[f"`{m['file']}` (SHA-256 {m['sha256']})"] for m in runs])
    tissue = _union([[m["tissue_protocol"]] for m in runs if m.get("tissue_protocol")])
    others = _union(m.get("protocols", []) for m in runs)
    wrote = []
    if tissue:
        wrote.append(f"tissue classes 1 GM, 2 WM, 3 CSF (protocol {', '.join(tissue)}; the `dseg` "
                     f"and the GM, WM and CSF `probseg` maps)")
    if others:
        wrote.append("the labels of " + ", ".join(f"`seg-{p}`" for p in others))
    return [f"A NeuroNet network {cite('rajchl2018')}, model {', '.join(models)}, trained with "
            f"dlf-bids-train-neuronet to reproduce several reference segmentation protocols, "
            f"segmented each raw T1w image (no skull stripping or bias correction) in one "
            f"forward pass with PyTorch{v('torch')} {cite('pytorch')}, on the model's grid and "
            f"brought back onto the T1w grid: {'; '.join(wrote)}."]


def _fusion_paragraph(method: str, records: list[RunStatus], cite, v) -> str:
    if method == "mv":
        return (f"Majority voting {cite('heckemann2006')} fused the warped atlas labels: each "
                f"voxel takes the label most atlases give it (`seg-mv`).")
    if method == "jlf":
        return (f"Joint label fusion {cite('wang2013')}, as implemented in ANTsPy, fused the "
                f"warped atlas labels within the dilated union of the atlas labels, weighting "
                f"each atlas by its local similarity to the subject and the atlases' correlated "
                f"errors (`seg-jlf`).")
    models = _union([[f"`{r.dlf_model['file']}` (SHA-256 {r.dlf_model['sha256']})"]
                     for r in records if r.dlf_model])
    used = sum(r.t2w_used for r in records)
    t2w = "The network was given no T2w image"
    if used:
        which = "The subject's" if used == len(records) else \
            f"For {used} of {len(records)} T1w images, the subject's"
        t2w = (f"{which} T2w image, rigidly registered and resampled onto the T1w grid, was the "
               f"network's second input")
    return (f"Deep Label Fusion {cite('xie2023')} fused the registered atlases with the trained "
            f"model {', '.join(models) or '(not recorded)'}, run with PyTorch{v('torch')} "
            f"{cite('pytorch')} (`seg-dlf`). {t2w}. A voxelwise uncertainty map, the normalised "
            f"entropy of the fused label distribution, was written next to the labels.")


NOTICE = ("This text was generated by dlf-bids from the records of the run, to be copied into a "
          "manuscript unchanged; it is released under the CC0 license.")


def methods_markdown(methods: Methods) -> str:
    refs = [f"{i}. {REFERENCES[k].text}" for i, k in enumerate(methods.keys, start=1)]
    return "\n\n".join(["# Methods", *methods.paragraphs, f"*{NOTICE}*", "## References",
                        "\n".join(refs)]) + "\n"


def write_citations(output_dir: Path | str, records: list[RunStatus]) -> tuple[Path, Path]:
    """``logs/CITATION.md`` (methods text + references) and ``logs/CITATION.bib``."""
    methods = methods_of(records)
    logs = Path(output_dir) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    md = write_text_atomic(logs / "CITATION.md", methods_markdown(methods))
    bib = write_text_atomic(logs / "CITATION.bib",
                            "\n\n".join(REFERENCES[k].bibtex(k) for k in methods.keys) + "\n")
    return md, bib
