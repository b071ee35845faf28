"""The shared foundation: params loading, geometry, landmark rendering, tables, CLI wiring."""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import pytest

from facecal import cli, config, geometry, render, tables
from facecal.config import ParamsError
from facecal.geometry import GeometryError


# ---------------------------------------------------------------- params
@dataclasses.dataclass
class _Inner:
    lr: float = 0.1
    betas: list[float] = dataclasses.field(default_factory=lambda: [0.5, 0.9])


@dataclasses.dataclass
class _Section:
    epochs: int = 3
    arch: Literal["a", "b"] = "a"
    name: str | None = None
    opt: _Inner = dataclasses.field(default_factory=_Inner)


def _params(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "params.yaml"
    p.write_text(text)
    return p


def test_load_section_builds_nested_typed_params(tmp_path):
    p = _params(tmp_path, "s:\n  epochs: 5\n  arch: b\n  opt: {lr: 1, betas: [0.1, 0.2]}\n")
    s = config.load_section(_Section, "s", p)
    assert s == _Section(epochs=5, arch="b", opt=_Inner(lr=1.0, betas=[0.1, 0.2]))
    assert isinstance(s.opt.lr, float)


def test_load_section_overrides_with_dotted_keys(tmp_path):
    p = _params(tmp_path, "s:\n  epochs: 5\n")
    s = config.load_section(_Section, "s", p, {"opt.lr": 0.5, "epochs": 7})
    assert (s.epochs, s.opt.lr) == (7, 0.5)


@pytest.mark.parametrize(
    "text, message",
    [
        ("s:\n  epoch: 5\n", "unknown field(s) ['epoch']"),
        ("s:\n  epochs: five\n", "s.epochs: expected an integer"),
        ("s:\n  epochs: true\n", "s.epochs: expected an integer"),
        ("s:\n  arch: c\n", "s.arch: 'c' is not one of ['a', 'b']"),
        ("s:\n  opt: {betas: 3}\n", "s.opt.betas: expected a list"),
        ("other: {}\n", "section 's' is missing"),
        ("s: [1, 2\n", "not valid YAML"),
    ],
)
def test_bad_params_name_the_field(tmp_path, text, message):
    with pytest.raises(ParamsError, match=None) as err:
        config.load_section(_Section, "s", _params(tmp_path, text))
    assert message in str(err.value)


def test_parse_override_reads_yaml_values():
    assert config.parse_override("gan.epochs=3") == ("gan.epochs", 3)
    assert config.parse_override("pairs.style=dots") == ("pairs.style", "dots")
    assert config.parse_override("gan.betas=[0.5, 0.9]") == ("gan.betas", [0.5, 0.9])
    with pytest.raises(ParamsError, match="KEY=VALUE"):
        config.parse_override("gan.epochs")


def test_params_hash_is_stable_and_sensitive():
    a, b = _Section(), _Section(epochs=4)
    assert config.params_hash(a) == config.params_hash(_Section())
    assert config.params_hash(a) != config.params_hash(b)


def test_project_params_file_is_complete(repo_root):
    """Every section the stages read exists in params.yaml."""
    data = config.read_params(repo_root / "params.yaml")
    for section in (
        "base",
        "landmarks",
        "calibration",
        "pairs",
        "gan",
        "generate",
        "cnn",
        "evaluate",
        "export",
        "register",
        "serve",
    ):
        assert section in data, section


# ---------------------------------------------------------------- geometry
def _random_faces(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = np.stack([np.linspace(-1.5, 1.5, 68), np.sin(np.linspace(0, 6, 68)) + 1], -1)
    return base + rng.normal(0, 0.05, (n, 68, 2))


def _similarity(angle: float, scale: float, t: tuple[float, float]) -> np.ndarray:
    c, s = np.cos(angle) * scale, np.sin(angle) * scale
    return np.array([[c, -s, t[0]], [s, c, t[1]]])


def test_fit_similarity_recovers_a_known_transform_batched():
    src = _random_faces(4)
    ms = np.stack([_similarity(0.3 * i, 1 + i, (i * 10.0, -5.0)) for i in range(4)])
    dst = geometry.apply_affine(ms, src)
    np.testing.assert_allclose(geometry.fit_similarity(src, dst), ms, atol=1e-9)


def test_fit_similarity_never_reflects():
    src = _random_faces(1)[0]
    mirrored = src * np.array([-1.0, 1.0])
    m = geometry.fit_similarity(src, mirrored)
    assert np.linalg.det(m[:, :2]) > 0


def test_canonical_frame_is_invariant_to_similarity_of_the_input():
    faces = _random_faces(3) * 40 + 100
    moved = geometry.apply_affine(_similarity(0.4, 2.5, (30.0, 7.0)), faces)
    a, _ = geometry.to_canonical(faces)
    b, _ = geometry.to_canonical(moved)
    np.testing.assert_allclose(a, b, atol=1e-9)


def test_crop_transform_puts_the_eyes_where_the_frame_says():
    faces = geometry.apply_affine(_similarity(0.2, 30, (64, 60)), _random_faces(1)[0])
    faces[geometry.RIGID_IDX] = geometry.apply_affine(
        _similarity(0.2, 30, (64, 60)), geometry.CANONICAL_RIGID
    )
    m = geometry.crop_transform(faces, 64)
    crop = geometry.apply_affine(m, faces)
    # Outer eye corners at canonical (±1, 0) → pixels ((±1 + 2)/4·64, 1.05/4·64).
    np.testing.assert_allclose(crop[36], [16.0, 16.8], atol=1e-9)
    np.testing.assert_allclose(crop[45], [48.0, 16.8], atol=1e-9)
    np.testing.assert_allclose(geometry.apply_affine(geometry.invert_affine(m), crop), faces)


def test_warp_image_moves_pixels_with_the_transform():
    img = np.zeros((40, 40), np.uint8)
    img[10, 20] = 255
    m = _similarity(0.0, 1.0, (5.0, 3.0))  # shift right 5, down 3
    out = geometry.warp_image(img, m, 40)
    assert np.unravel_index(out.argmax(), out.shape) == (13, 25)


@pytest.mark.parametrize(
    "bad, message",
    [
        (np.zeros((67, 2)), "expected shape"),
        (np.full((68, 2), np.nan), "NaN"),
        (np.stack([np.arange(68.0), np.zeros(68)], -1), "collinear"),
        ([["a", "b"]], "not numeric"),
    ],
)
def test_check_points_rejects_degenerate_input(bad, message):
    with pytest.raises(GeometryError, match=message):
        geometry.check_points(bad)


def test_nme_is_mean_error_over_outer_eye_distance():
    truth = _random_faces(1)[0] * 50
    shifted = truth + np.array([3.0, 4.0])  # every point off by 5 px
    expected = 5.0 / np.linalg.norm(truth[45] - truth[36])
    assert geometry.nme(shifted, truth) == pytest.approx(expected)


# ---------------------------------------------------------------- rendering
@pytest.mark.parametrize("style", render.STYLES)
def test_render_landmarks_draws_only_near_the_points(style):
    pts = np.stack([np.linspace(10, 54, 68), np.linspace(20, 44, 68)], -1)
    img = render.render_landmarks(pts, 64, style)
    assert img.shape == (64, 64, 3) and img.dtype == np.uint8
    ink = (img < 250).any(-1)
    ys, xs = np.nonzero(ink)
    assert ink.sum() > 68
    assert xs.min() >= 8 and xs.max() <= 56 and ys.min() >= 18 and ys.max() <= 46
    np.testing.assert_array_equal(img, render.render_landmarks(pts, 64, style))


def test_render_rejects_wrong_shape_and_style():
    with pytest.raises(ValueError, match="68"):
        render.render_landmarks(np.zeros((5, 2)), 64)
    with pytest.raises(ValueError, match="style"):
        render.render_landmarks(np.zeros((68, 2)), 64, "lines")


# ---------------------------------------------------------------- tables
def test_points_columns_round_trip(tmp_path):
    pts = _random_faces(3)
    df = tables.with_points(pd.DataFrame({"image": ["a", "b", "c"]}), "points", pts)
    df["gt"] = tables.points_column([pts[0], None, pts[2]])
    tables.write_table(df, tmp_path / "t.parquet")
    back = tables.read_table(tmp_path / "t.parquet")
    np.testing.assert_allclose(tables.points_array(back), pts)
    with pytest.raises(tables.TableError, match="1 row"):
        tables.points_array(back, "gt")
    with pytest.raises(tables.TableError, match="not found"):
        tables.read_table(tmp_path / "missing.parquet")


# ---------------------------------------------------------------- CLI
def test_every_command_module_exposes_its_entry_points():
    import importlib

    for cmd in cli.COMMANDS:
        module = importlib.import_module(cmd.module)
        assert callable(getattr(module, cmd.add_arguments)), cmd.name
        assert callable(getattr(module, cmd.main)), cmd.name


def test_cli_help_exits_cleanly(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    assert "landmarks" in capsys.readouterr().out


def test_child_processes_find_the_tools_installed_beside_this_interpreter(monkeypatch):
    # `make run` starts .venv/bin/facecal without an activated venv; its dvc and stages must
    # still be the venv's.
    from facecal.paths import with_scripts_on_path
    from facecal.pipeline import child_env

    scripts = os.path.dirname(sys.executable)
    env = with_scripts_on_path({"PATH": "/usr/bin:/bin"})
    assert env["PATH"].split(os.pathsep) == [scripts, "/usr/bin", "/bin"]
    assert with_scripts_on_path(env) == env  # once, not again and again
    assert with_scripts_on_path({})["PATH"] == scripts
    monkeypatch.setenv("PATH", "/usr/bin")
    assert child_env()["PATH"].split(os.pathsep)[0] == scripts
    assert child_env()["DVC_NO_ANALYTICS"] == "1"
