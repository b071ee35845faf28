"""facecal.warp: the piecewise-affine landmark warp (geometry of the warp-and-refine generator)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from _faces import template
from facecal.warp import (
    PiecewiseAffineWarp,
    frame_anchors,
    sampling_grid,
    source_points,
    triangle_choice,
    triangulate,
    warp,
    warp_faces,
)

SIZE = 128


@pytest.fixture(scope="module")
def mesh():
    return torch.as_tensor(triangulate(template(), SIZE, SIZE))


def _blobs(points: np.ndarray, size: int, sigma: float = 1.2) -> torch.Tensor:
    """A 1×1×size×size image with a Gaussian blob centred on every point (continuous pixels)."""
    c = np.arange(size) + 0.5
    img = np.zeros((size, size))
    for x, y in points:
        img += np.exp(-((c[None, :] - x) ** 2 + (c[:, None] - y) ** 2) / (2 * sigma**2))
    return torch.as_tensor(img, dtype=torch.float64)[None, None]


def _centroid(img: np.ndarray, x: float, y: float, r: int = 3) -> tuple[float, float]:
    c = np.arange(img.shape[0]) + 0.5
    x0, y0 = int(x), int(y)
    win = img[y0 - r : y0 + r + 1, x0 - r : x0 + r + 1]
    cx, cy = c[x0 - r : x0 + r + 1], c[y0 - r : y0 + r + 1]
    return float((win.sum(0) * cx).sum() / win.sum()), float((win.sum(1) * cy).sum() / win.sum())


def test_mesh_covers_the_frame_once(mesh):
    verts = np.concatenate([template(), frame_anchors(SIZE, SIZE)])
    tri = verts[mesh.numpy()]
    area = 0.5 * np.abs(
        (tri[:, 1, 0] - tri[:, 0, 0]) * (tri[:, 2, 1] - tri[:, 0, 1])
        - (tri[:, 2, 0] - tri[:, 0, 0]) * (tri[:, 1, 1] - tri[:, 0, 1])
    )
    assert area.sum() == pytest.approx(SIZE * SIZE)
    assert set(np.unique(mesh.numpy())) == set(range(len(verts)))  # every landmark is a vertex


def test_equal_landmarks_are_the_identity(mesh):
    g = torch.Generator().manual_seed(0)
    img = torch.rand(2, 3, SIZE, SIZE, generator=g, dtype=torch.float64)
    pts = torch.as_tensor(np.stack([template(), template() + 3.3]))
    out = warp(img, pts, pts, mesh)
    torch.testing.assert_close(out, img, atol=1e-9, rtol=0)


def _expression_change(src: np.ndarray) -> np.ndarray:
    """A smooth expression-like change: the mouth opens and widens, brows rise, plus jitter."""
    rng = np.random.default_rng(1)
    dst = src.copy()
    dst[48:68, 1] += np.where(src[48:68, 1] > src[62, 1], 4.0, -1.5)
    dst[48:68, 0] += (src[48:68, 0] - 64) * 0.12
    dst[17:27, 1] -= 3.0
    return dst + rng.uniform(-0.7, 0.7, dst.shape)


def test_every_target_landmark_is_taken_from_its_source_landmark(mesh):
    src = template()
    dst = _expression_change(src)
    got = source_points(
        torch.as_tensor(src[None]),
        torch.as_tensor(dst[None]),
        mesh,
        torch.as_tensor(dst[None]),
        SIZE,
        SIZE,
    )[0].numpy()
    np.testing.assert_allclose(got, src, atol=1e-9)


def test_known_points_land_on_known_targets_to_a_subpixel(mesh):
    """Pixels, not just the mesh: blobs drawn on source points end up centred on the targets."""
    src = template()
    # A smooth displacement field of up to 2.5 px.
    dst = src + np.stack([2.0 * np.sin(src[:, 1] / 20), 1.5 * np.cos(src[:, 0] / 25)], 1)
    # Points far enough apart for their blobs to be measured one by one.
    keep = [0, 4, 8, 12, 16, 17, 21, 26, 30, 31, 35, 36, 45, 48, 51, 54, 57]
    out = warp(
        _blobs(src[keep], SIZE, sigma=0.8),
        torch.as_tensor(src[None]),
        torch.as_tensor(dst[None]),
        mesh,
    )[0, 0].numpy()
    err = np.array([np.hypot(*np.subtract(_centroid(out, *dst[i]), dst[i])) for i in keep])
    assert err.max() < 0.3, err


def test_affine_landmarks_give_the_affine_map_inside_the_face(mesh):
    src = template()
    m = np.array([[1.05, -0.08, 2.0], [0.08, 1.05, -3.0]])
    dst = src @ m[:, :2].T + m[:, 2]
    grid = sampling_grid(torch.as_tensor(src[None]), torch.as_tensor(dst[None]), mesh, SIZE, SIZE)[
        0
    ].numpy()
    # Pixel centres well inside the face (eyes to mouth): the inverse affine map exactly.
    inv = np.linalg.inv(np.vstack([m, [0, 0, 1]]))[:2]
    ys, xs = np.mgrid[55:80, 45:85] + 0.5
    expected = np.stack([xs, ys], -1) @ inv[:, :2].T + inv[:, 2]
    np.testing.assert_allclose(grid[55:80, 45:85], expected, atol=1e-9)


def test_points_at_the_border_stay_finite_and_in_range(mesh):
    src = template().copy()
    src[0] = (0.6, src[0, 1])  # jaw points on the left and right edges
    src[16] = (SIZE - 0.6, src[16, 1])
    src[8] = (src[8, 0], SIZE - 0.4)  # the chin on the bottom edge
    dst = src.copy()
    dst[0, 0], dst[16, 0], dst[8, 1] = 0.05, SIZE - 0.05, SIZE - 0.02
    g = torch.Generator().manual_seed(2)
    img = torch.rand(1, 3, SIZE, SIZE, generator=g, dtype=torch.float64)
    s, d = torch.as_tensor(src[None]), torch.as_tensor(dst[None])
    out = warp(img, s, d, mesh)
    assert torch.isfinite(out).all()
    assert out.min() >= img.min() - 1e-12 and out.max() <= img.max() + 1e-12
    torch.testing.assert_close(warp(img, s, s, mesh), img, atol=1e-9, rtol=0)
    grid = sampling_grid(s, d, mesh, SIZE, SIZE)
    assert (grid >= -1e-9).all() and (grid <= SIZE + 1e-9).all()  # never outside the frame


def test_a_known_triangle_choice_gives_the_same_warp_bit_for_bit(mesh):
    """Training finds each pair's triangles once (`triangle_choice`) and then evaluates one
    triangle per pixel: that must be the warp of the full rule exactly, or the trained weights
    would depend on the speed-up — also where triangles fold and at the frame's border."""
    src = np.stack([template(), template()])
    dst = np.stack([_expression_change(src[0]), src[1].copy()])
    dst[0, 57] = dst[0, 51] - [0.0, 2.0]  # the lower lip crosses the upper one: triangles fold
    dst[1, 0], dst[1, 8] = (0.05, dst[1, 0, 1]), (dst[1, 8, 0], SIZE - 0.02)  # on the border
    s = torch.as_tensor(src, dtype=torch.float32)
    d = torch.as_tensor(dst, dtype=torch.float32)
    g = torch.Generator().manual_seed(3)
    img = torch.rand(2, 3, SIZE, SIZE, generator=g)
    choice = triangle_choice(d, mesh, SIZE, SIZE, chunk=1000)  # a chunk that does not divide
    assert choice.shape == (2, SIZE, SIZE) and choice.dtype == torch.uint8
    assert int(choice.max()) < len(mesh)
    assert torch.equal(warp(img, s, d, mesh, choice=choice), warp(img, s, d, mesh))
    # The choice depends on the targets only: with another source (here: the targets
    # themselves, i.e. the identity) the same triangles hold.
    torch.testing.assert_close(warp(img, d, d, mesh, choice=choice), img, atol=1e-4, rtol=0)


def test_warp_exports_to_onnx_with_parity(mesh, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    module = PiecewiseAffineWarp(mesh.numpy()).eval()
    g = torch.Generator().manual_seed(3)
    img = torch.rand(2, 3, 64, 64, generator=g)
    src = torch.as_tensor(np.stack([template() / 2, template() / 2 + 1]), dtype=torch.float32)
    dst = src + torch.randn(src.shape, generator=g) * 0.8
    path = tmp_path / "warp.onnx"
    torch.onnx.export(
        module,
        (img, src, dst),
        str(path),
        input_names=["image", "src", "dst"],
        output_names=["warped"],
        opset_version=18,
        dynamo=True,
    )
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = sess.run(None, {"image": img.numpy(), "src": src.numpy(), "dst": dst.numpy()})
    with torch.no_grad():
        want = module(img, src, dst).numpy()
    assert np.abs(got - want).max() < 1e-4


def test_warp_faces_moves_uint8_faces_and_keeps_equal_landmarks_exact():
    rng = np.random.default_rng(4)
    faces = rng.integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    src = np.stack([template() / 2 + rng.normal(0, 0.5, (68, 2)) for _ in range(3)])
    np.testing.assert_array_equal(warp_faces(faces, src, src), faces)
    dst = src.copy()
    dst[:, 48:68, 1] += 3.0  # the mouth moves down 3 px
    moved = warp_faces(faces, src, dst)
    assert moved.shape == faces.shape and moved.dtype == np.uint8
    # Inside the lips every triangle's corners moved by the same whole 3 px: the pixels there
    # are the source's, 3 rows up, exactly.
    cx, cy = dst[0, [50, 51, 52, 61, 62, 63]].mean(0)
    y, x = int(cy), int(cx)
    np.testing.assert_array_equal(moved[0, y, x], faces[0, y - 3, x])
    assert warp_faces(faces[:0], src[:0], dst[:0]).shape == (0, 64, 64, 3)


def test_photo_warp_without_torch_matches_the_torch_warp():
    """`warp_mesh.warp_region` (numpy, what `facecal serve` runs) and `warp.warp` agree."""
    from facecal.warp_mesh import face_region, warp_region

    rng = np.random.default_rng(5)
    photo = rng.integers(0, 256, (300, 260, 3), dtype=np.uint8)
    src = template() + [60.0, 90.0]  # the face somewhere inside a larger photo
    dst = src + np.stack([2.0 * np.sin(src[:, 1] / 20), 1.5 * np.cos(src[:, 0] / 25)], 1)
    np.testing.assert_array_equal(warp_region(photo.copy(), src, src), photo)
    got = warp_region(photo.copy(), src, dst)
    x0, y0, x1, y1 = face_region(src, dst, 260, 300)
    outside = np.ones(photo.shape[:2], bool)
    outside[y0:y1, x0:x1] = False
    np.testing.assert_array_equal(got[outside], photo[outside])
    sub = photo[y0:y1, x0:x1]
    tri = torch.as_tensor(triangulate(src - [x0, y0], x1 - x0, y1 - y0))
    want = (
        warp(
            torch.as_tensor(sub, dtype=torch.float64).permute(2, 0, 1)[None],
            torch.as_tensor((src - [x0, y0])[None]),
            torch.as_tensor((dst - [x0, y0])[None]),
            tri,
        )[0]
        .permute(1, 2, 0)
        .round()
        .numpy()
    )
    assert np.abs(got[y0:y1, x0:x1].astype(float) - want).max() <= 1


def test_per_triangle_pixel_sources_equal_the_full_rule_even_where_triangles_fold():
    from facecal.warp_mesh import frame_anchors, pixel_sources, source_points_np

    w, h = 96, 80
    src = template() * [w / 128, h / 128]
    dst = src.copy()
    dst[48:68] += [0.0, 3.0]
    dst[57] = dst[51] - [0.0, 2.0]  # the lower lip crosses the upper one: triangles fold
    tri = triangulate(src, w, h)
    a = frame_anchors(w, h)
    sv, dv = np.concatenate([src, a]), np.concatenate([dst, a])
    ys, xs = np.mgrid[0:h, 0:w]
    q = np.stack([xs.ravel() + 0.5, ys.ravel() + 0.5], 1)
    full = source_points_np(sv, dv, tri, q).reshape(h, w, 2)
    np.testing.assert_allclose(pixel_sources(sv, dv, tri, w, h), full, atol=1e-9)


def test_the_warp_makes_its_tensors_on_its_inputs_device(mesh):
    # A grid or anchors made on the CPU fail as soon as the points live on a GPU (warp_refine
    # training and validation); the meta device stands in for CUDA on a CPU-only machine.
    pts = torch.as_tensor(template(), dtype=torch.float32)[None].to("meta")
    image = torch.zeros(1, 3, SIZE, SIZE, device="meta")
    out = warp(image, pts, pts, mesh.to("meta"))
    assert out.device.type == "meta" and out.shape == (1, 3, SIZE, SIZE)
