"""The project's wiring files agree with each other (dvc.yaml, params.yaml, MLproject, conda.yaml,
pyproject.toml) — the mistakes that otherwise only show on a fresh machine."""

from __future__ import annotations

import configparser
import tomllib

import yaml

from facecal import cli

STAGES = [
    "landmarks",
    "calibrate",
    "pairs",
    "train_gan",
    "generate",
    "train_cnn",
    "evaluate",
    "export",
    "export_cnn",
    "register",
    "register_cnn",
]


def _yaml(path):
    return yaml.safe_load(path.read_text())


def test_dvc_pipeline_has_every_stage_in_order(repo_root):
    stages = _yaml(repo_root / "dvc.yaml")["stages"]
    assert list(stages) == STAGES


def test_every_stage_depends_on_its_own_code_and_params(repo_root):
    stages = _yaml(repo_root / "dvc.yaml")["stages"]
    params = _yaml(repo_root / "params.yaml")
    commands = {c.name: c for c in cli.COMMANDS}
    for name, stage in stages.items():
        words = stage["cmd"].split()
        assert words[0] == "facecal", name
        command = commands[words[1]]
        module_file = "src/" + command.module.replace(".", "/")
        deps = [d if isinstance(d, str) else next(iter(d)) for d in stage["deps"]]
        assert any(
            module_file.startswith(d.rstrip("/")) or d.startswith(module_file) for d in deps
        ), f"{name} does not depend on {module_file}"
        for p in stage.get("params", []):
            key = p if isinstance(p, str) else next(iter(p))
            section, *rest = key.split(".")
            assert section in params, f"{name}: params section {section} missing"
            node = params[section]
            for part in rest:
                assert part in node, f"{name}: param {key} missing"
                node = node[part]
        for out in stage.get("outs", []):
            path = out if isinstance(out, str) else next(iter(out))
            assert not path.startswith("data"), f"{name} writes inside data/ ({path})"


def test_mlproject_has_main_and_one_entry_per_stage(repo_root):
    entries = _yaml(repo_root / "MLproject")["entry_points"]
    assert set(entries) == {"main", *STAGES}
    for stage in STAGES:
        assert f"facecal pipeline {stage} --single-item" in entries[stage]["command"]


def test_conda_env_pins_match_pyproject(repo_root):
    deps = tomllib.loads((repo_root / "pyproject.toml").read_text())["project"]["dependencies"]
    conda = _yaml(repo_root / "conda.yaml")["dependencies"]
    pip = next(d["pip"] for d in conda if isinstance(d, dict))
    assert sorted(p for p in pip if p != "-e .") == sorted(deps)
    assert "-e ." in pip
    assert "python=3.11" in conda


def test_dvc_analytics_disabled(repo_root):
    cfg = configparser.ConfigParser()
    cfg.read(repo_root / ".dvc" / "config")
    assert cfg.get("core", "analytics") == "false"
