"""facecal.generate: what is generated, from which landmarks, with which reference."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from _faces import subject_without_neutral
from _tail import build_project, weak_images
from facecal import geometry, render, tables
from facecal.generate import (
    BaseParams,
    FaceGenerator,
    GenerateParams,
    plan_generation,
    reference_candidates,
    run_generate,
)
from facecal.imageio import load_image
from facecal.manifest import Report
from facecal.references import choose_references


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return build_project(tmp_path_factory.mktemp("gen"))


def _run(p, out, alpha=1.0):
    params = GenerateParams(alpha=alpha, batch_size=16, sweep_alphas=[0.0, 0.5, 1.0], sweep_faces=2)
    return run_generate(
        params,
        BaseParams(),
        p["data"],
        p["table"],
        p["calibrated"],
        p["gan"],
        out / "generate",
        out / "plots",
    )


def test_plan_blends_calibrated_points_and_passes_neutral_through(project):
    lm = tables.read_table(project["table"])
    cal = tables.read_table(project["calibrated"])
    plan = plan_generation(lm, cal, 0.5, Report())
    weak = weak_images(lm)
    n_neutral = int((lm["emotion"] == "neutral").sum())
    assert (
        (plan["kind"] == "calibrated").sum() == (plan["kind"] == "uncalibrated").sum() == len(weak)
    )
    assert (plan["kind"] == "neutral").sum() == n_neutral
    own = cal[cal["target_emotion"] == cal["emotion"]].set_index("image")
    for r in plan.itertuples():
        image = lm.loc[r.iid, "image"]
        orig = np.asarray(lm.loc[r.iid, "points"]).reshape(68, 2)
        if r.kind == "calibrated":
            target = np.asarray(own.loc[image, "calibrated"]).reshape(68, 2)
            np.testing.assert_allclose(r.points, 0.5 * orig + 0.5 * target)
            assert r.alpha == 0.5
        else:
            np.testing.assert_array_equal(r.points, orig)


def test_generate_writes_every_face_with_the_pairs_reference(project, tmp_path):
    summary = _run(project, tmp_path)
    out = tmp_path / "generate"
    index = pd.read_csv(out / "index.csv", dtype={"subject": str})
    lm = tables.read_table(project["table"])
    weak = weak_images(lm)
    assert summary["skipped"] == 0
    assert (
        len(index)
        == summary["generated"]
        == 2 * len(weak) + int((lm["emotion"] == "neutral").sum())
    )
    # Every split keeps its faces' split; the train split is what the CNN regimes will see.
    merged = index.merge(lm[["image", "split", "subject"]], on="image", suffixes=("", "_lm"))
    assert (merged["split"] == merged["split_lm"]).all() and (
        merged["subject"] == merged["subject_lm"]
    ).all()
    assert summary["test_calibrated"] == sum(
        1 for i in weak if lm.set_index("image").loc[i, "split"] == "test"
    )
    refs = choose_references(lm[lm["status"] == "ok"])
    emotion_of = lm.set_index("image")["emotion"]
    for r in index.itertuples():
        img = load_image(out / r.path)
        assert img.shape == (64, 64, 3)
        assert r.ref_image == lm.loc[refs[r.iid][0], "image"]  # the pairs stage's choice
        assert r.ref_image != r.image
        # Never a face of the emotion being generated (it would hand the generator the answer).
        assert emotion_of[r.ref_image] == "neutral" or emotion_of[r.ref_image] != r.emotion
    # 2 faces × (landmark row + face row), real face + 3 alphas; shown at 2× (64² faces).
    assert load_image(tmp_path / "plots/sweep.png").shape == (
        2 * (4 * 64 + 3 * 2),
        2 * (4 * 64 + 3 * 2),
        3,
    )
    # Deterministic: a second run gives the same bytes.
    _run(project, tmp_path / "again")
    for r in index.itertuples():
        assert (out / r.path).read_bytes() == (tmp_path / "again/generate" / r.path).read_bytes()


def test_generator_sees_the_calibrated_landmarks(project):
    """The landmark image fed for a calibrated face is drawn from the blended points in the
    face's own crop frame: generating through FaceGenerator equals calling the network on
    that drawing by hand."""
    import torch

    lm = tables.read_table(project["table"])
    cal = tables.read_table(project["calibrated"])
    plan = plan_generation(lm, cal, 1.0, Report())
    row = plan[plan["kind"] == "calibrated"].iloc[0]
    gen = FaceGenerator(project["gan"])
    m = geometry.crop_transform(np.asarray(lm.loc[row.iid, "points"]).reshape(68, 2), 64)
    crop_pts = geometry.apply_affine(m, row.points)
    ref = np.zeros((1, 64, 64, 3), np.uint8) + 128
    face = gen(crop_pts[None], ref)
    lmk = render.render_landmarks(crop_pts, 64, "edges")
    x = torch.cat(
        [
            torch.from_numpy(lmk.copy()).permute(2, 0, 1)[None].float() / 127.5 - 1,
            torch.full((1, 3, 64, 64), 128 / 127.5 - 1),
        ],
        1,
    )
    with torch.no_grad():
        y = gen.model(x)
    expected = ((y.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(face, expected)


def test_unreadable_reference_is_passed_over_and_lone_faces_are_handled(project, tmp_path):
    lm = tables.read_table(project["table"])
    # Subject s0's neutral face is every other s0 face's first reference choice.
    neutral = lm.loc[(lm["subject"] == "s0") & (lm["emotion"] == "neutral"), "image"].iloc[0]
    # Subject s1 keeps a single usable face, a weak one: it is its own reference. Subject s2
    # keeps a single neutral face: no reference exists for it (it would be a copy of itself).
    lone = sorted(i for i in weak_images(lm) if i.startswith("images/s1_"))[0]
    lone_neutral = lm.loc[(lm["subject"] == "s2") & (lm["emotion"] == "neutral"), "image"].iloc[0]
    lm.loc[(lm["subject"] == "s1") & (lm["image"] != lone), "status"] = "no_face"
    lm.loc[(lm["subject"] == "s2") & (lm["image"] != lone_neutral), "status"] = "no_face"
    p = dict(
        project, table=tmp_path / "landmarks.parquet", calibrated=tmp_path / "calibrated.parquet"
    )
    tables.write_table(lm, p["table"])
    cal = tables.read_table(project["calibrated"])  # as calibrate writes it: ok faces only
    tables.write_table(
        cal[cal["image"].isin(lm.loc[lm["status"] == "ok", "image"])], p["calibrated"]
    )
    victim = project["data"] / neutral
    original = victim.read_bytes()
    try:
        victim.write_bytes(b"not an image")
        summary = _run(p, tmp_path)
    finally:
        victim.write_bytes(original)
    index = pd.read_csv(tmp_path / "generate/index.csv")
    failures = pd.read_csv(tmp_path / "generate/failures.csv")
    assert neutral not in set(index["ref_image"])
    # The neutral face itself is still generated: it needs its landmarks, not its pixels.
    assert neutral in set(index["image"])
    lone_rows = index[index["image"] == lone]
    assert sorted(lone_rows["kind"]) == ["calibrated", "uncalibrated"]
    assert (lone_rows["ref_image"] == lone).all()
    assert lone_neutral not in set(index["image"])
    assert summary["skipped"] == len(failures) == 1  # the lone neutral face
    assert failures["item"].str.contains(lone_neutral, regex=False).all()
    assert failures["reason"].str.contains("reference").all()


def test_reference_is_never_a_face_of_the_generated_emotion():
    """A subject without a neutral face: by intensity alone the weak anger face's reference
    would be the same subject's anger apex — the face the generated one is compared with."""
    faces = subject_without_neutral("test")
    refs = reference_candidates(faces, weak_rows={0})
    assert refs[0] == [2, 0]  # the happy face, then the weak face itself; never the anger apex
    assert refs[1] == [2]  # an apex face is never its own reference
    assert refs[2] == [0, 1]
    only_anger = faces.iloc[:2]
    assert reference_candidates(only_anger, weak_rows={0}) == {0: [0], 1: []}


def test_warp_refine_writes_calibrated_faces_at_the_photos_resolution(project, tmp_path):
    """generate.full_resolution: each calibrated face whose reference is the weak face itself
    also comes out as its photo, same size, changed only inside the face region, and — seen
    through the crop transform — the 64² generated face."""
    import torch

    from facecal.faces import FaceCrops
    from facecal.gan.models import build_generator, generator_config, save_generator
    from facecal.warp_mesh import face_region, triangulate

    lm = tables.read_table(project["table"])
    crops = FaceCrops(project["data"], lm, 64)
    mean = np.mean([crops.crop_points(i) for i in lm.index], 0)
    kw = {"ngf": 8, "triangles": triangulate(mean, 64, 64).tolist()}
    torch.manual_seed(0)
    G = build_generator("warp_refine", 64, 6, **kw)
    with torch.no_grad():  # no initial mask bias: the untrained net paints visibly
        G.refine.model.model[3].bias.zero_()
    gan = tmp_path / "gan"
    save_generator(G, generator_config("warp_refine", 64, "edges", True, kw), gan)
    p = {**project, "gan": gan}
    summary = _run(p, tmp_path)
    out = tmp_path / "generate"
    index = pd.read_csv(out / "index.csv", dtype={"subject": str})
    own_ref = index[(index["kind"] == "calibrated") & (index["ref_image"] == index["image"])]
    assert len(own_ref) and summary["photos"] == len(own_ref)
    cal = tables.read_table(project["calibrated"])
    target_of = cal[cal["target_emotion"] == cal["emotion"]].set_index("image")["calibrated"]
    for r in own_ref.itertuples():
        photo = load_image(project["data"] / r.image)
        full = load_image(tmp_path / f"generate_photos/{r.split}/IID{r.iid}.png")
        assert full.shape == photo.shape
        own = np.asarray(lm.loc[r.iid, "points"]).reshape(68, 2)
        target = np.asarray(target_of[r.image]).reshape(68, 2)
        x0, y0, x1, y1 = face_region(own, target, photo.shape[1], photo.shape[0])
        outside = np.ones(photo.shape[:2], bool)
        outside[y0:y1, x0:x1] = False
        np.testing.assert_array_equal(full[outside], photo[outside])
        assert np.abs(full.astype(int) - photo.astype(int))[y0:y1, x0:x1].mean() > 1
        # The same face as the crop generate wrote (the centre: feathering fades the border).
        seen = geometry.warp_image(full, crops.transform(r.iid), 64)
        face = load_image(out / r.path)
        diff = np.abs(seen.astype(int) - face.astype(int))[16:48, 16:48]
        assert diff.mean() < 6, (r.image, diff.mean())
    # Other generators write none.
    assert _run(project, tmp_path / "p2p")["photos"] == 0
    assert list((tmp_path / "p2p/generate_photos").iterdir()) == []
