"""The pipeline's stage modules: the one list the import rules of tests/test_structure.py use.

A stage module (a DVC stage's ``cmd: facecal <command>``) may import library modules only, never
another stage; library modules never import a stage. What two stages share lives in a library
module. The entry points (`facecal.cli`, `facecal.__main__`, `facecal.pipeline`) may import
anything.
"""

from __future__ import annotations

# dvc.yaml's `cmd: facecal <command>` → the module that implements it (facecal.cli.COMMANDS).
STAGE_COMMANDS: dict[str, str] = {
    "landmarks": "facecal.landmarks",
    "calibrate": "facecal.calibrate",
    "pairs": "facecal.pairs",
    "train-gan": "facecal.gan.train",
    "generate": "facecal.generate",
    "train-cnn": "facecal.classifier",
    "evaluate": "facecal.evaluate",
    "export": "facecal.export",
    "export-cnn": "facecal.export_classifier",
    "register": "facecal.registry",
    "register-cnn": "facecal.register_classifier",
}

# Modules of the DVC stages, in pipeline order.
STAGE_MODULES: tuple[str, ...] = tuple(dict.fromkeys(STAGE_COMMANDS.values()))

# May import any module, stages included (kfold runs the stage commands once per fold).
ENTRY_POINTS: tuple[str, ...] = (
    "facecal.cli",
    "facecal.__main__",
    "facecal.pipeline",
    "facecal.kfold",
)
