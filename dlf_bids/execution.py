"""Which Nipype execution plugin runs the graph, and with what settings.

dlf-bids never schedules work itself: one machine uses Nipype's MultiProc (``--nprocs``,
``--mem-gb``); a cluster uses Nipype's SLURM/SGE/PBS plugins through ``--plugin-config FILE``, a
YAML file as fMRIPrep's ``--use-plugin`` takes::

    plugin: SLURM
    plugin_args:
      sbatch_args: "--time=02:00:00 --mem=4G --cpus-per-task=1"

Ready files are in the repository's ``workflows/plugins/``.
"""

from __future__ import annotations

import getpass
from contextlib import contextmanager
import os
from pathlib import Path

from .errors import MissingInputError, UsageError

# Nipype plugins that make sense for a BIDS-App run (Linear is for debugging).
PLUGINS = ("MultiProc", "Linear", "SLURM", "SLURMGraph", "SGE", "SGEGraph", "PBS", "PBSGraph",
           "LSF", "Condor", "OAR")


def load_plugin_config(path: Path) -> tuple[str, dict]:
    """Read a plugin YAML file: ``plugin`` (a Nipype plugin name) and optional ``plugin_args``."""
    import yaml

    if not path.is_file():
        raise MissingInputError(f"plugin config {path} does not exist")
    try:
        content = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        line = getattr(getattr(err, "problem_mark", None), "line", None)
        where = f" (line {line + 1})" if line is not None else ""
        raise UsageError(f"plugin config {path} is not valid YAML{where}") from None
    if not isinstance(content, dict) or "plugin" not in content:
        raise UsageError(f"plugin config {path} must be a mapping with a 'plugin' key "
                         f"(one of {', '.join(PLUGINS)})")
    plugin = str(content["plugin"])
    match = {p.lower(): p for p in PLUGINS}.get(plugin.lower())
    if match is None:
        raise UsageError(f"plugin config {path}: unknown plugin {plugin!r} "
                         f"(one of {', '.join(PLUGINS)})")
    args = content.get("plugin_args") or {}
    if not isinstance(args, dict):
        raise UsageError(f"plugin config {path}: 'plugin_args' must be a mapping")
    unknown = set(content) - {"plugin", "plugin_args"}
    if unknown:
        raise UsageError(f"plugin config {path}: unknown key(s) {', '.join(sorted(unknown))}")
    return match, dict(args)


@contextmanager
def torch_without_thread_pool():
    """Run torch work (a model check) in this process with one thread, then restore the count.

    MultiProc forks its workers from this process; once torch has run a parallel region here,
    its OpenMP pool exists and a forked worker that runs torch hangs forever in it (measured:
    a convolution here, then one in each worker). With one thread no pool is started.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def plugin_settings(plugin: str, file_args: dict | None, nprocs: int, mem_gb: float | None,
                    status_callback=None) -> tuple[str, dict]:
    """The plugin name and arguments for ``workflow.run``.

    For MultiProc, ``--nprocs``/``--mem-gb`` win over the file (they are the documented flags);
    ``maxtasksperchild=1`` keeps every node in a fresh process so torch/ITK thread pools and memory
    do not leak between nodes.
    """
    args = dict(file_args or {})
    if plugin.startswith("SLURM") and "LOGNAME" not in os.environ:
        # Nipype's SLURM plugins read $LOGNAME (for squeue -u), which batch and container
        # environments often lack
        os.environ["LOGNAME"] = getpass.getuser()
    if plugin == "MultiProc":
        args.setdefault("raise_insufficient", False)
        args.setdefault("maxtasksperchild", 1)
        args["n_procs"] = nprocs
        if mem_gb:
            args["memory_gb"] = mem_gb
    if status_callback is not None:
        args["status_callback"] = status_callback
    return plugin, args


def configure_nipype(crash_dir: Path | None = None, verbose: int = 0, **execution) -> None:
    """Nipype's settings for every dlf-bids command: file inputs hashed by content (commands
    share work dirs, so they must agree: a DLF training rerun once re-registered everything),
    crash reports as text in ``crash_dir``, quiet logging, plus any ``execution`` settings.

    Call it **before building a workflow**: a Workflow copies Nipype's config when it is created
    and that copy wins at run time, so settings made later are silently ignored."""
    from nipype import config as ncfg

    settings = {"hash_method": "content", **execution}
    if crash_dir is not None:
        settings.update(crashdump_dir=str(crash_dir), crashfile_format="txt")
    ncfg.update_config({"execution": settings})
    quiet_nipype(verbose)


def quiet_nipype(verbose: int = 0) -> None:
    """Nipype's workflow/interface logging at WARNING unless ``verbose``: its import resets them to
    INFO (its own config), so this runs after nipype is imported, before a workflow runs."""
    from nipype import config as ncfg
    from nipype import logging as nlogging

    level = "INFO" if verbose else "WARNING"
    ncfg.update_config({"logging": {"workflow_level": level, "interface_level": level}})
    nlogging.update_logging(ncfg)
