"""Upload what DVC's run records name, so that a teammate's ``dvc exp run`` restores instead of rerunning.

``dvc push --run-cache`` uploads the run records (``.dvc/cache/runs``) and the outputs of the
workspace, not the outputs the records point to: another experiment's model, and every
``cache: false`` metric and plot (DVC copies those into the local cache when it records a run,
but never pushes them). A teammate who pulls the records then finds them without their outputs
and runs the stage again. :func:`push_run_outputs` pushes those outputs too, from the local cache.
"""

from __future__ import annotations

from pathlib import Path


def run_entries(runs_dir: str | Path) -> list[tuple[str, str]]:
    """Every local run record as DVC names it: (stage key, entry hash); ``runs_dir`` is ``.dvc/cache/runs``."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        return []
    return sorted((p.parent.name, p.name) for p in runs_dir.glob("*/*/*") if p.is_file())


def push_run_outputs(repo_root: str | Path = ".", remote: str | None = None, jobs: int | None = None) -> dict:
    """Push to ``remote`` (the default one when None) every cached object that a local run record names.

    Returns ``{"records", "objects", "transferred", "failed"}`` (counts). Objects missing from the
    local cache (e.g. removed by ``dvc gc``) are counted as failed; nothing else is changed.
    """
    from dvc.repo import Repo

    with Repo(str(repo_root)) as repo:
        repo.cloud.get_remote(remote, "push-runs")  # no remote configured: DVC's NoRemoteError, before any work
        entries = run_entries(repo.stage_cache.cache_dir)
        used = repo.stage_cache.get_used_objs(entries) if entries else {}
        objects = set().union(*used.values()) if used else set()
        result = repo.cloud.push(objects, jobs=jobs, remote=remote) if objects else None
    return {
        "records": len(entries),
        "objects": len(objects),
        "transferred": len(result.transferred) if result else 0,
        "failed": len(result.failed) if result else 0,
    }
