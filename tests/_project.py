"""A throwaway copy of the project as a git repository (what DVC runs need)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path


def copy_project(repo: Path, dest: Path) -> None:
    """The project's tracked files as they are in the working tree (a clean clone's content)."""
    files = (
        subprocess.run(["git", "ls-files", "-z"], cwd=repo, check=True, capture_output=True)
        .stdout.decode()
        .split("\0")
    )
    for rel in filter(None, files):
        src = repo / rel
        if src.is_file() and not rel.startswith(("data/", "outputs/")):
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    for cmd in (git + ["init", "-q"], git + ["add", "-A"], git + ["commit", "-qm", "copy"]):
        subprocess.run(cmd, cwd=dest, check=True, capture_output=True)
