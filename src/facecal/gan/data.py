"""Paired training data for the GAN: any folder of ``PID<p>_CLEAN0/CLEAN1[/REF]_IID<k>`` files.

Pairs are matched by PID only, as the original loader did. Small sets are decoded once into
one in-memory uint8 tensor (64² × 800 pairs × 9 channels ≈ 30 MB), so the model never waits
for JPEG decoding; sets above ``cache_mb`` are decoded on the fly by DataLoader workers. Both
paths yield exactly the same batches: the order is a pure function of (seed, epoch), sharded
across DDP ranks like `DistributedSampler`, so a resumed or multi-process run sees the data a
single uninterrupted run would.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from facecal.errors import FacecalError
from facecal.imageio import load_image
from facecal.manifest import Report
from facecal.pair_files import PAIR_FILE, POINTS_FILE


class PairDataError(FacecalError):
    """A pairs folder with no usable pairs."""


@dataclass(frozen=True)
class PairFiles:
    pid: int
    landmarks: Path
    face: Path
    ref: Path | None


def scan_pairs(
    directory: str | Path, identity: bool, report: Report | None = None
) -> list[PairFiles]:
    """Complete pairs in `directory` sorted by PID; incomplete ones go to `report`.

    With `identity`, a pair also needs its ``_REF_`` file.
    """
    d = Path(directory)
    if not d.is_dir():
        raise PairDataError(f"{d}: pairs folder not found")
    report = report if report is not None else Report()
    parts: dict[int, dict[str, Path]] = {}
    for f in sorted(d.iterdir()):
        m = PAIR_FILE.match(f.name)
        if not m:
            continue
        slot = parts.setdefault(int(m["pid"]), {})
        part = m["part"].upper()
        if part in slot:
            report.add(f, f"second {part} file for PID {m['pid']} (kept {slot[part].name})")
            continue
        slot[part] = f
    pairs = []
    for pid in sorted(parts):
        slot = parts[pid]
        missing = [
            p for p in ("CLEAN0", "CLEAN1") + (("REF",) if identity else ()) if p not in slot
        ]
        if missing:
            report.add(next(iter(slot.values())), f"PID {pid} has no {'/'.join(missing)} file")
            continue
        pairs.append(PairFiles(pid, slot["CLEAN0"], slot["CLEAN1"], slot.get("REF")))
    return pairs


def load_points(directory: str | Path, pairs: list[PairFiles]) -> np.ndarray:
    """(N, 2, 68, 2) float32 (reference points, target points) in crop pixels for `pairs`, from
    the folder's `POINTS_FILE` (written by the pairs stage; warp_refine needs it)."""
    path = Path(directory) / POINTS_FILE
    if not path.is_file():
        raise PairDataError(
            f"{path}: the pairs' landmark points are missing (re-run `facecal pairs`; "
            f"gan.arch warp_refine warps the reference by them)"
        )
    try:
        with np.load(path) as z:
            pid, target, ref = z["pid"], z["target"], z["ref"]
    except (OSError, KeyError, ValueError) as e:
        raise PairDataError(f"{path}: unreadable points file: {e}") from e
    if target.shape != (len(pid), 68, 2) or ref.shape != target.shape:
        raise PairDataError(f"{path}: expected (N, 68, 2) target and ref arrays")
    row = {int(p): i for i, p in enumerate(pid)}
    out = np.zeros((len(pairs), 2, 68, 2), np.float32)
    for k, p in enumerate(pairs):
        i = row.get(p.pid)
        if i is None or not (np.isfinite(ref[i]).all() and np.isfinite(target[i]).all()):
            raise PairDataError(f"{path}: no reference and target points for PID {p.pid}")
        out[k, 0], out[k, 1] = ref[i], target[i]
    return out


def decode(path: Path, size: int) -> np.ndarray:
    """One pair image as uint8 (3, size, size), resized when the file has another size."""
    img = load_image(path, "RGB")
    if img.shape[:2] != (size, size):
        img = np.asarray(Image.fromarray(img).resize((size, size), Image.Resampling.BICUBIC))
    return np.ascontiguousarray(img.transpose(2, 0, 1))


def decode_pair(p: PairFiles, size: int, identity: bool) -> np.ndarray:
    """(C, size, size) uint8: landmarks (3), [reference (3)], face (3)."""
    chans = [decode(p.landmarks, size)]
    if identity:
        assert p.ref is not None  # identity pairs are scanned with their reference
        chans.append(decode(p.ref, size))
    chans.append(decode(p.face, size))
    return np.concatenate(chans, 0)


class PairDataset(torch.utils.data.Dataset):
    """Pairs decoded on access (large sets); item = uint8 (C, H, W) as `decode_pair`."""

    def __init__(self, pairs: list[PairFiles], size: int, identity: bool):
        self.pairs, self.size, self.identity = pairs, size, identity

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(decode_pair(self.pairs[i], self.size, self.identity))


class PairSource:
    """The training pairs of one folder, in memory or decoded by workers, and their batches.

    A batch is a uint8 tensor (B, C, H, W) — generator input channels first, the face last —
    plus, for the PLDT losses, the faces of other randomly chosen pairs, and for warp_refine
    the pairs' `points_of` (always in memory: 1 KB a pair).
    """

    def __init__(
        self,
        pairs: list[PairFiles],
        size: int,
        identity: bool,
        cache_mb: float = 2048,
        workers: int = 0,
        report: Report | None = None,
        progress: bool = True,
        points: np.ndarray | None = None,
    ):
        if not pairs:
            raise PairDataError("no complete pairs to train on")
        if points is not None and len(points) != len(pairs):
            raise PairDataError(f"{len(points)} point sets for {len(pairs)} pairs")
        self.pairs, self.size, self.identity, self.workers = pairs, size, identity, workers
        self.in_channels = 6 if identity else 3
        channels = self.in_channels + 3
        need_mb = len(pairs) * channels * size * size / 2**20
        self.data: torch.Tensor | None = None
        self.dataset = PairDataset(pairs, size, identity)
        if need_mb <= cache_mb:
            keep, arrays = [], []
            report = report if report is not None else Report()
            for p in tqdm(
                pairs,
                desc="decode pairs",
                unit="pair",
                disable=not progress,
                file=sys.stderr,
                leave=False,
            ):
                try:
                    arrays.append(decode_pair(p, size, identity))
                    keep.append(p)
                except FacecalError as e:
                    report.add(p.face, str(e))
            if not keep:
                raise PairDataError("no pair could be decoded")
            if points is not None:
                kept = {id(p) for p in keep}
                points = points[[id(p) in kept for p in pairs]]
            self.pairs = keep
            self.dataset = PairDataset(keep, size, identity)
            self.data = torch.from_numpy(np.stack(arrays))
        self.points = torch.from_numpy(points) if points is not None else None
        # (N, S, S) target triangle of every pixel of each pair's warp, once the mesh is known
        # (`gan.train`): finding it is most of a warp's cost and the targets never change.
        self.choices: torch.Tensor | None = None

    def points_of(self, indices: list[int]) -> torch.Tensor | None:
        """(B, 2, 68, 2) float32 (reference, target) points of these pairs, or None."""
        return self.points[indices] if self.points is not None else None

    def choices_of(self, indices: list[int]) -> torch.Tensor | None:
        """(B, S, S) the pairs' warp triangles (see `choices`), or None."""
        return self.choices[indices] if self.choices is not None else None

    def __len__(self) -> int:
        return len(self.pairs)

    def fingerprint(self) -> str:
        """What the data is: the decoded pixels when cached, else names and sizes of files."""
        h = hashlib.sha256()
        if self.data is not None:
            h.update(self.data.numpy().tobytes())
        else:
            for p in self.pairs:
                for f in (p.landmarks, p.face, p.ref):
                    if f is not None:
                        h.update(f"{f.name}:{f.stat().st_size};".encode())
        if self.points is not None:
            h.update(self.points.numpy().tobytes())
        h.update(f"{len(self)}:{self.size}:{self.identity}".encode())
        return h.hexdigest()[:16]

    def take(self, indices: list[int]) -> torch.Tensor:
        """Decoded pairs at these indices (for sample grids and validation)."""
        if self.data is not None:
            return self.data[indices]
        return torch.stack([self.dataset[i] for i in indices])

    def epoch_batches(
        self, epoch: int, batch_size: int, seed: int, rank: int = 0, world: int = 1
    ) -> list[list[int]]:
        """This rank's batches of one epoch: a seeded permutation padded to a multiple of the
        world size and strided over ranks (DistributedSampler's scheme), then chunked."""
        n = len(self)
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        order = torch.randperm(n, generator=g).tolist()
        per_rank = -(-n // world)
        order += order[: per_rank * world - n]
        mine = order[rank::world]
        return [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]

    def other_indices(self, epoch: int, indices: list[int], seed: int) -> list[int]:
        """For each index, another pair's index: a pure function of (seed, epoch, index), so it
        needs no RNG state to resume."""
        n = len(self)
        if n < 2:
            return list(indices)
        offsets = np.random.default_rng([seed, epoch, 7]).integers(1, n, size=n)
        return [int((i + offsets[i]) % n) for i in indices]

    def iterate(self, batches: list[list[int]], pin: bool = False) -> Iterator[torch.Tensor]:
        """uint8 (B, C, H, W) per batch, in order."""
        if self.data is not None:
            for b in batches:
                yield self.data[b]
            return
        loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_sampler=batches,
            num_workers=self.workers,
            pin_memory=pin,
            persistent_workers=False,
            prefetch_factor=4 if self.workers else None,
        )
        yield from loader
