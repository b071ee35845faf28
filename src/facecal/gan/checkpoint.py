"""Checkpoints of a training run: written atomically, the newest `KEEP_CHECKPOINTS` kept,
named by the run's training hash and step; the newest readable one of a run is where a restart
resumes."""

from __future__ import annotations

import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from facecal.gan.runtime import Runtime

KEEP_CHECKPOINTS = 2
CKPT_NAME = re.compile(r"^ckpt-(?P<hash>[0-9a-f]{12})-(?P<step>\d{8})\.pt$")


def rng_state(rt: Runtime) -> dict[str, Any]:
    s = {"torch": torch.get_rng_state()}
    if rt.device.type == "cuda":
        s["cuda"] = torch.cuda.get_rng_state(rt.device)
    return s


def gather(obj: Any, rt: Runtime) -> list[Any]:
    if not rt.distributed:
        return [obj]
    out: list[Any] = [None] * rt.world
    torch.distributed.all_gather_object(out, obj)
    return out


def list_checkpoints(ckpt_dir: Path, run_hash: str | None = None) -> list[tuple[int, Path]]:
    """(step, path) of the checkpoints in `ckpt_dir`, newest first (only `run_hash`'s if given)."""
    if not ckpt_dir.is_dir():
        return []
    found = []
    for f in ckpt_dir.iterdir():
        m = CKPT_NAME.match(f.name)
        if m and (run_hash is None or m["hash"] == run_hash):
            found.append((int(m["step"]), f))
    return sorted(found, key=lambda t: t[0], reverse=True)


def save_checkpoint(ckpt_dir: Path, run_hash: str, step: int, payload: dict[str, Any]) -> Path:
    """Write atomically (temp file, fsync, rename); keep the newest KEEP_CHECKPOINTS of this
    run and remove checkpoints of other configurations."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    path = ckpt_dir / f"ckpt-{run_hash}-{step:08d}.pt"
    fd, tmp = tempfile.mkstemp(prefix=".tmp-ckpt-", suffix=".pt", dir=ckpt_dir)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    mine = list_checkpoints(ckpt_dir, run_hash)
    for _, old in mine[KEEP_CHECKPOINTS:]:
        old.unlink(missing_ok=True)
    for _, other in list_checkpoints(ckpt_dir):
        if not other.name.startswith(f"ckpt-{run_hash}-"):
            other.unlink(missing_ok=True)
    for stale in ckpt_dir.glob(".tmp-ckpt-*"):  # left by a killed writer
        if stale.name != Path(tmp).name:
            stale.unlink(missing_ok=True)
    return path


def load_latest_checkpoint(
    ckpt_dir: Path, run_hash: str, max_step: int
) -> tuple[dict[str, Any] | None, Path | None]:
    """The newest readable checkpoint of this run at or below `max_step`; unreadable ones are
    skipped with a warning naming them."""
    for step, path in list_checkpoints(ckpt_dir, run_hash):
        if step > max_step:
            continue
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
            if (
                not isinstance(payload, dict)
                or payload.get("hash") != run_hash
                or payload.get("step") != step
            ):
                raise ValueError("contents do not match its name")
            return payload, path
        except Exception as e:  # truncated/corrupt files raise many types
            warnings.warn(
                f"checkpoint {path} is unreadable ({type(e).__name__}: {e}); "
                f"falling back to the previous one",
                RuntimeWarning,
                stacklevel=2,
            )
    return None, None


def restore_rng(payload: dict[str, Any], rt: Runtime) -> None:
    """This rank's RNG state from a checkpoint (kept only if as many ranks wrote it)."""
    rng = payload["rng"]
    mine = rng[rt.rank] if len(rng) == rt.world else None
    if mine is not None:
        torch.set_rng_state(mine["torch"])
        if "cuda" in mine and rt.device.type == "cuda":
            torch.cuda.set_rng_state(mine["cuda"], rt.device)
