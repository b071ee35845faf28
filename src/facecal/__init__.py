"""facecal: landmark calibration for facial expressions, from raw faces to a served generator."""

__version__ = "0.1.0"
