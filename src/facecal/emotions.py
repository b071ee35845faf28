"""The emotion vocabulary and the names other datasets use for it."""

from __future__ import annotations

from facecal.errors import FacecalError

NEUTRAL = "neutral"
# Fixed order: class indices of every classifier and column order of every confusion matrix.
EMOTIONS: tuple[str, ...] = (
    "neutral",
    "anger",
    "contempt",
    "disgust",
    "fear",
    "happy",
    "sad",
    "surprise",
)
EXPRESSIVE: tuple[str, ...] = tuple(e for e in EMOTIONS if e != NEUTRAL)

_ALIASES = {
    "neutral": ("neutral", "ne", "neu", "none", "calm"),
    "anger": ("anger", "angry", "an", "ang", "mad"),
    "contempt": ("contempt", "contemptuous", "co", "con"),
    "disgust": ("disgust", "disgusted", "di", "dis"),
    "fear": ("fear", "fearful", "afraid", "scared", "fe", "fea", "af"),  # af: KDEF
    "happy": ("happy", "happiness", "joy", "ha", "hap", "smile"),
    "sad": ("sad", "sadness", "sa"),
    "surprise": ("surprise", "surprised", "su", "sur"),
}
_LOOKUP = {alias: name for name, aliases in _ALIASES.items() for alias in aliases}

# Official integer codes of datasets that store emotions as numbers.
CKPLUS_CODES = {
    0: "neutral",
    1: "anger",
    2: "contempt",
    3: "disgust",
    4: "fear",
    5: "happy",
    6: "sad",
    7: "surprise",
}
FER2013_CODES = {
    0: "anger",
    1: "disgust",
    2: "fear",
    3: "happy",
    4: "sad",
    5: "surprise",
    6: "neutral",
}


class UnknownEmotion(FacecalError):
    """A label that maps to no emotion of the vocabulary."""


def normalize_emotion(label: str) -> str:
    """Map a dataset's label (``"Angry"``, ``"HA"``, ``"surprised"``) to the vocabulary."""
    key = str(label).strip().lower()
    try:
        return _LOOKUP[key]
    except KeyError:
        raise UnknownEmotion(
            f"unknown emotion label {label!r}; expected one of {list(EMOTIONS)} or a known alias"
        ) from None


def emotion_index(name: str) -> int:
    return EMOTIONS.index(normalize_emotion(name))
