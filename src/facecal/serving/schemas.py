"""The pydantic request models of the JSON endpoints (FastAPI reads them at runtime)."""

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from facecal.serving.settings import MAX_IMAGE_SIDE

Coord = Annotated[float, Field(allow_inf_nan=False)]
Point = Annotated[list[Coord], Field(min_length=2, max_length=2)]


class GenerateRequest(BaseModel):
    """68 landmarks (iBUG order, x = column, y = row) of one face."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": []})
    landmarks: Annotated[
        list[Point], Field(min_length=68, max_length=68, description="68 [x, y] points")
    ]
    frame: Literal["crop", "image"] = Field(
        "crop",
        description="crop: pixels of the model's aligned face crop (see "
        "/v1/model input_size); image: pixels of a photo of size "
        "image_size, aligned here exactly as the training faces were",
    )
    image_size: (
        Annotated[
            list[Annotated[int, Field(ge=1, le=MAX_IMAGE_SIDE)]],
            Field(min_length=2, max_length=2),
        ]
        | None
    ) = Field(None, description="[width, height] of the photo (frame 'image' only)")
    reference: str | None = Field(
        None,
        description="identity models: base64 PNG/JPEG of the subject's face — the "
        "aligned crop (frame 'crop') or, in frame 'image', the photo the landmarks come "
        "from (or another photo, with reference_landmarks); default: the model's average face",
    )
    reference_landmarks: Annotated[list[Point], Field(min_length=68, max_length=68)] | None = Field(
        None,
        description="frame 'image', warp_refine models: the reference photo's own 68 points "
        "(its pixels) when it is another photo than the one `landmarks` come from — the "
        "person's face is then warped from these points to `landmarks`; default: `landmarks` "
        "(the reference is their own photo)",
    )


class BatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    items: Annotated[list[GenerateRequest], Field(min_length=1)]
