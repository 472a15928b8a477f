"""The model registry end to end: a tiny run, its card, a GTO version, `dvc push`, `dvc artifacts get` elsewhere."""

from __future__ import annotations

import json

from conftest import VENV_BIN, dvc, make_repo_copy, run


def test_register_push_and_get_the_model_by_version(tmp_path):
    repo, storage, origin = tmp_path / "repo", tmp_path / "remote", tmp_path / "origin.git"
    make_repo_copy(repo)
    dvc(repo, "repro")

    # The card was generated from this run's files.
    card = (repo / "models" / "MODEL_CARD.md").read_text()
    test = json.loads((repo / "metrics" / "test.json").read_text())
    export = json.loads((repo / "metrics" / "export.json").read_text())
    assert f"| rmse | {test['rmse']:.4f} |" in card and f"| dice | {test['dice']:.4f} |" in card
    assert f"on {export['parity_images']} test images" in card and "MIT, like the code" in card
    assert "-S train.epochs=2" in card

    dvc(repo, "remote", "add", "-d", "shared", str(storage))
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "run and remote"], repo)
    run([str(VENV_BIN / "gto"), "register", "covidseg-unet", "--version", "v0.1.0"], repo)
    assert "covidseg-unet@v0.1.0" in run(["git", "tag"], repo).stdout
    assert "v0.1.0" in run([str(VENV_BIN / "gto"), "show", "covidseg-unet"], repo).stdout
    dvc(repo, "push")
    run(["git", "init", "-q", "--bare", "--initial-branch=main", str(origin)], tmp_path)
    run(["git", "push", "-q", "--tags", str(origin), "HEAD:refs/heads/main"], repo)

    # A consumer with nothing but the Git URL: DVC clones it, reads the artifact and fetches from the remote.
    clean = tmp_path / "clean"
    clean.mkdir()
    dvc(clean, "artifacts", "get", str(origin), "covidseg-unet", "--rev", "v0.1.0")
    assert (clean / "model.pt").read_bytes() == (repo / "models" / "model.pt").read_bytes()
