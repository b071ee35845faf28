"""The `facecal` command line: a table of subcommands, each implemented by a module.

A command's module is imported only when that command runs (or shows its --help), so
`facecal --help` does not pay for torch, dlib or MLflow. A module provides
``add_arguments(parser)`` and ``main(args) -> int | None`` (other names can be given below).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from dataclasses import dataclass

from facecal.errors import FacecalError


@dataclass(frozen=True)
class Command:
    name: str  # words after `facecal`, e.g. "data import"
    module: str
    help: str
    add_arguments: str = "add_arguments"
    main: str = "main"


COMMANDS: tuple[Command, ...] = (
    Command(
        "data import",
        "facecal.data.importers",
        "import a dataset (jaffe, ckplus, fer2013, folder) into the canonical layout",
    ),
    Command(
        "data synth",
        "facecal.data.synth",
        "render the embedded synthetic expression dataset with exact landmarks",
    ),
    Command("data validate", "facecal.data.validate", "check a dataset's manifest and files"),
    Command(
        "landmarks",
        "facecal.landmarks",
        "stage: 68-point dlib landmarks for every face (or one image with -i)",
    ),
    Command(
        "calibrate",
        "facecal.calibrate",
        "stage: gold templates and calibrated landmarks of weak expressions",
    ),
    Command(
        "calibrate-pair",
        "facecal.calibrate",
        "calibrate one target landmark file toward one gold file (the original tool)",
        "add_pair_arguments",
        "main_pair",
    ),
    Command("pairs", "facecal.pairs", "stage: aligned (landmark image, face) training pairs"),
    Command("train-gan", "facecal.gan.train", "stage: train the landmark-to-face generator"),
    Command(
        "generate",
        "facecal.generate",
        "stage: generate faces from calibrated and uncalibrated landmarks",
    ),
    Command("train-cnn", "facecal.classifier", "stage: train one expression CNN per regime"),
    Command(
        "classify",
        "facecal.classify",
        "recognise the expression of faces in photos (a train_cnn model, its ONNX or registry URI)",
    ),
    Command("evaluate", "facecal.evaluate", "stage: accuracy, intervals, image quality, report"),
    Command(
        "kfold",
        "facecal.kfold",
        "every regime under subject-independent k-fold, a generator trained per fold",
    ),
    Command("export", "facecal.export", "stage: export the generator to ONNX with a parity check"),
    Command(
        "export-cnn",
        "facecal.export_classifier",
        "stage: export the expression CNN to ONNX with a parity check",
    ),
    Command(
        "register",
        "facecal.registry",
        "stage: register the ONNX generator in MLflow and run the promotion gate",
        "add_register_arguments",
        "main_register",
    ),
    Command(
        "promote",
        "facecal.registry",
        "promote a registered version to champion by hand",
        "add_promote_arguments",
        "main_promote",
    ),
    Command(
        "register-cnn",
        "facecal.register_classifier",
        "stage: register the ONNX classifier in MLflow and run its promotion gate",
    ),
    Command(
        "promote-cnn",
        "facecal.register_classifier",
        "promote a registered classifier version to champion by hand",
        "add_promote_arguments",
        "main_promote",
    ),
    Command("serve", "facecal.serving.app", "serve the generator over HTTP (FastAPI)"),
    Command(
        "pipeline", "facecal.pipeline", "run the whole DVC pipeline under one MLflow pipeline run"
    ),
)


def build_parser(selected: Command | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="facecal",
        description="Landmark calibration for facial expressions: data → dlib landmarks → "
        "calibration → landmark-to-face GAN → expression CNN → ONNX serving.",
    )
    top = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    groups: dict[str, argparse._SubParsersAction] = {}
    for cmd in COMMANDS:
        words = cmd.name.split()
        sub = top
        if len(words) == 2:
            if words[0] not in groups:
                group = top.add_parser(words[0], help=f"{words[0]} commands")
                groups[words[0]] = group.add_subparsers(
                    dest="subcommand", metavar="SUBCOMMAND", required=True
                )
            sub = groups[words[0]]
        p = sub.add_parser(words[-1], help=cmd.help, description=cmd.help)
        p.set_defaults(_command=cmd)
        if cmd is selected:
            module = importlib.import_module(cmd.module)
            getattr(module, cmd.add_arguments)(p)
    return parser


def _select(argv: list[str]) -> Command | None:
    """The command named at the start of argv (ignoring options), if any."""
    words = [a for a in argv if not a.startswith("-")][:2]
    for cmd in COMMANDS:
        if cmd.name.split() == words[: len(cmd.name.split())]:
            return cmd
    return None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    selected = _select(argv)
    args = build_parser(selected).parse_args(argv)
    cmd: Command = args._command
    func = getattr(importlib.import_module(cmd.module), cmd.main)
    try:
        return int(func(args) or 0)
    except FacecalError as e:
        if os.environ.get("FACECAL_DEBUG"):
            raise
        print(f"facecal {cmd.name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"facecal {cmd.name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
