"""The container recipes, checked without a container engine (none runs in CI).

Singularity.def, containers/Singularity.cpu.def and containers/Dockerfile are parsed with spython
(the Singularity project's own recipe parser) and must agree on the base image, torch version,
pinned requirements, environment and entry point; the pins must cover setup.cfg's dependencies.
"""

from __future__ import annotations

import configparser
import json
import re
from pathlib import Path

import pytest

from dlf_bids import __version__
from dlf_bids import OFFLINE
from dlf_bids.utils.derivatives import write_dataset_description

spython_parsers = pytest.importorskip("spython.main.parse.parsers")

REPO = Path(__file__).resolve().parents[1]
RECIPES = {"singularity-cuda": REPO / "Singularity.def",
           "singularity-cpu": REPO / "containers" / "Singularity.cpu.def",
           "docker": REPO / "containers" / "Dockerfile"}


def _parse(name):
    parser = spython_parsers.DockerParser if name == "docker" else spython_parsers.SingularityParser
    return parser(str(RECIPES[name])).recipe["spython-base"]


def _environ(recipe) -> dict[str, str]:
    env = {}
    for item in recipe.environ:
        for pair in re.findall(r"(\w+)=(\S+)", item):
            env[pair[0]] = pair[1]
    return env


def _pins() -> dict[str, str]:
    pins = {}
    for line in (REPO / "containers" / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"unpinned requirement {line!r}"
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_parses_with_the_shared_base(name):
    recipe = _parse(name)
    assert recipe.fromHeader == "python:3.11-slim-bookworm"


def test_same_torch_version_everywhere():
    texts = {name: path.read_text() for name, path in RECIPES.items()}
    docker = re.search(r"ARG TORCH_VERSION=(\S+)", texts["docker"]).group(1)
    for name in ("singularity-cuda", "singularity-cpu"):
        assert re.findall(r"torch==(\S+)", texts[name]) == [docker], name
    ci = (REPO / ".ci" / "run").read_text()
    assert f"torch=={docker}" in ci, "the images must ship the torch CI tests with"
    # the CPU flavours take the CPU wheel; the CUDA Singularity image takes PyPI's default build
    assert "whl/cpu" in texts["singularity-cpu"] and "whl/cpu" not in texts["singularity-cuda"]


def test_same_environment_and_entry_point():
    docker, sif_cuda, sif_cpu = _parse("docker"), _parse("singularity-cuda"), _parse("singularity-cpu")
    # OFFLINE: the settings dlf-bids' own entry points apply, also set for anything else run in
    # the image; TemplateFlow reads its skeleton from the image instead of unpacking it under HOME
    want = {"OMP_NUM_THREADS": "1", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS": "1", **OFFLINE,
            "TEMPLATEFLOW_HOME": "/opt/templateflow",
            "DLF_BIDS_CONTAINER_TAG": f"dlf-bids:{__version__}"}
    for recipe, kind in ((docker, "docker"), (sif_cuda, "singularity"), (sif_cpu, "singularity")):
        env = _environ(recipe)
        assert {k: env.get(k) for k in want} == want, recipe.source
        assert env["DLF_BIDS_CONTAINER"] == kind
    assert docker.entrypoint == ["dlf-bids"]
    assert sif_cuda.cmd == sif_cpu.cmd == 'exec dlf-bids "$@"'


def test_templateflow_skeleton_is_unpacked_at_build_time():
    """With TEMPLATEFLOW_HOME in the read-only image, templateflow must find it populated: an
    empty one makes the import of niworkflows try to write there."""
    for name in RECIPES:
        install = "\n".join(_parse(name).install)
        assert 'python -c "import templateflow"' in install, name
        assert install.index("--no-deps /opt/dlf-bids") < install.index("import templateflow"), name
    sif = RECIPES["singularity-cpu"].read_text(), RECIPES["singularity-cuda"].read_text()
    for text in sif:  # %post does not see %environment: the build names the folder itself
        assert 'TEMPLATEFLOW_HOME=/opt/templateflow python -c "import templateflow"' in text


def test_docker_image_runs_as_an_unprivileged_user():
    install = _parse("docker").install
    users = [item.split()[1] for item in install if item.strip().startswith("USER ")]
    assert users, "no USER instruction: the container would run as root"
    final = users[-1]
    assert final not in ("root", "0") and not final.startswith("0:"), final
    created = re.search(r"useradd (?:--\S+ )*--uid (\d+) .*\b" + re.escape(final) + r"$",
                        "\n".join(install), re.MULTILINE)
    assert created and int(created.group(1)) >= 1000, "the USER must be created with a non-system uid"
    # no build step runs after the switch: everything root must do happens before it
    text = RECIPES["docker"].read_text()
    assert not re.search(r"^(RUN|COPY|ADD)\b", text[text.rindex("\nUSER "):], re.MULTILINE)


def test_every_recipe_installs_the_pins_then_the_package_without_deps():
    for name, path in RECIPES.items():
        text = path.read_text()
        assert "pip install -r /opt/dlf-bids/containers/requirements.txt" in text, name
        assert "pip install --no-deps /opt/dlf-bids" in text, name
        assert text.index("requirements.txt") < text.index("--no-deps"), name


def test_pins_cover_the_package_dependencies():
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    requires = [line.strip() for line in cfg["options"]["install_requires"].splitlines() if line.strip()]
    pins = _pins()
    for requirement in requires:
        name = re.sub(r"[-_.]+", "-", re.split(r"[ <>=!~;\[]", requirement)[0]).lower()
        if name == "torch":
            continue  # installed by the recipe itself, CPU or CUDA build
        assert name in pins, f"{name} (setup.cfg) is not pinned in containers/requirements.txt"
    assert "bids-validator-deno" in pins  # input validation at run time
    assert "torch" not in pins


def test_generated_by_names_the_container(tmp_path, monkeypatch):
    monkeypatch.setenv("DLF_BIDS_CONTAINER", "singularity")
    monkeypatch.setenv("DLF_BIDS_CONTAINER_TAG", f"dlf-bids:{__version__}")
    desc = json.loads(write_dataset_description(tmp_path, tmp_path / "bids", None).read_text())
    assert desc["GeneratedBy"][0]["Container"] == {"Type": "singularity",
                                                   "Tag": f"dlf-bids:{__version__}"}
    monkeypatch.delenv("DLF_BIDS_CONTAINER")
    desc = json.loads(write_dataset_description(tmp_path, tmp_path / "bids", None).read_text())
    assert "Container" not in desc["GeneratedBy"][0]
