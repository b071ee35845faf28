"""The warp_refine paint strength scanned on a finished run's weak test faces (a script, not a test).

    python bench/paint_gain.py --workdir .                 # after `make run`
    python bench/paint_gain.py --workdir . --gains 0 0.25 0.5 1

For each weak test face with a stronger face of its emotion (the subject's apex, as `evaluate`
scores it), the run's generator paints over the warp of the weak face to the target points, and
the composition face = warp + g·(1 − mask)·(painted − warp) is scored by SSIM against the apex,
paired with the pure warp (g = 0): mean difference ± 1.96 SE per g. Targets: the calibrated
points (what the pipeline serves), the apex's own points (an oracle: no calibration error) and
the weak face's own points. `train_gan` picks g on the val pairs (`gan.warp_refine.paint_gain`);
this shows what that choice does on the test faces. The generator's saved strength is ignored.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from facecal import geometry, metrics, tables
from facecal.evaluate import _unit, strong_references  # scored exactly as evaluate scores
from facecal.faces import FaceCrops
from facecal.generation import FaceGenerator, own_emotion_rows
from facecal.selection import weak_images
from facecal.warp import warp_faces


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("."))
    ap.add_argument("--gan", type=Path, default=None, help="generator folder (outputs/gan)")
    ap.add_argument("--gains", type=float, nargs="+", default=[0.25, 0.5, 0.75, 1.0])
    args = ap.parse_args()
    w = args.workdir
    table = tables.read_table(w / "outputs/landmarks/landmarks.parquet")
    calibrated = tables.read_table(w / "outputs/calibrate/calibrated.parquet")
    faces = table[table["status"] == "ok"]
    test = faces[faces["split"] == "test"]
    weak = weak_images(calibrated)
    rows = [i for i in test.index if test.loc[i, "image"] in weak]
    strong = strong_references(faces, rows)
    rows = [i for i in rows if i in strong]
    own_cal = own_emotion_rows(calibrated).set_index("image")
    gen = FaceGenerator(args.gan or w / "outputs/gan")
    if not gen.points:
        raise SystemExit(f"{gen.config['arch']}: only warp_refine paints over a warp")
    gen.model.paint_gain = 1.0  # scan from the net as trained
    crops = FaceCrops(w / "data", table, gen.size)

    def crop_points(frame: int, points) -> np.ndarray:
        """Landmarks in the crop frame of table row `frame`."""
        pts = np.asarray(points, np.float64).reshape(68, 2)
        return geometry.apply_affine(crops.transform(frame), pts)

    weak_u8 = np.stack([crops.get(i) for i in rows])
    apex_u8 = np.stack([crops.get(strong[i]) for i in rows])
    own = np.stack([crop_points(i, table.loc[i, "points"]) for i in rows])
    targets = {
        "calibrated": np.stack(
            [crop_points(i, own_cal.loc[table.loc[i, "image"], "calibrated"]) for i in rows]
        ),
        "apex (oracle)": np.stack(
            [crop_points(strong[i], table.loc[strong[i], "points"]) for i in rows]
        ),
        "own": own,
    }
    apex = _unit(apex_u8)
    print(f"{len(rows)} weak test faces; SSIM to the own apex, paired with the pure warp")
    for name, dst in targets.items():
        warped_u8 = warp_faces(weak_u8, own, dst)
        painted, mask = gen.painted_and_mask(dst, weak_u8, own)
        warped = warped_u8.astype(np.float32) / 255.0
        base = metrics.ssim(_unit(warped_u8), apex)
        cells = [f"warp {base.mean():.4f}"]
        for g in args.gains:
            face = warped + g * (1.0 - mask) * (painted - warped)
            face_u8 = np.clip(np.rint(face * 255.0), 0, 255).astype(np.uint8)
            d = metrics.ssim(_unit(face_u8), apex) - base
            cells.append(f"g {g:g}: {d.mean():+.4f} ± {1.96 * d.std(ddof=1) / np.sqrt(len(d)):.4f}")
        print(f"{name:14s} " + " | ".join(cells) + f" | painted share {(1 - mask).mean():.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
