"""The landmark-to-face GAN: networks and file contract (`models`), paired data (`data`),
the training stage (`train`)."""

import os

# Idle OpenMP threads sleep instead of spinning (read once, when torch loads): on cores shared
# with other work, spinning threads made a 2-thread training ~8× slower (measured 5.8–7.5 s vs
# 0.7–0.8 s for the same steps under load); the numbers are the same either way.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


from facecal.gan.models import (  # noqa: E402
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
