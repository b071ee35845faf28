"""The landmark-to-face GAN: networks and file contract (`models`), paired data (`data`),
the training stage (`train`)."""

from facecal.gan.models import (
    ARCHS,
    GeneratorError,
    build_discriminators,
    build_generator,
    generator_config,
    load_generator,
    save_generator,
)

__all__ = [
    "ARCHS",
    "GeneratorError",
    "build_discriminators",
    "build_generator",
    "generator_config",
    "load_generator",
    "save_generator",
]
