"""The HTTP API's shapes: request and response models (with the OpenAPI examples), the routes, and how an
error's `reason` becomes a status code.

Items are checked here only for JSON types; what a value means (a missing field for the task, a box out of the
image, decoding settings out of range, too many candidates) is the predictor's to say, per item.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ofa_model.errors import BAD_TYPE, IMAGE_TOO_LARGE, MISSING_FIELD
from ofa_model.generation import GenerationConfig

# Reasons of the HTTP layer, beside the predictor's (`ofa_model.errors`).
MALFORMED_BODY = "malformed_body"  # not JSON, or not a multipart form
UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"  # neither application/json nor multipart/form-data
BODY_TOO_LARGE = "body_too_large"  # a body over max_body_bytes
BODY_TIMEOUT = "body_timeout"  # the body did not arrive within body_timeout_s: answered, then the connection closed
UNAUTHORIZED = "unauthorized"  # no or a wrong API key
UNKNOWN_MODEL = "unknown_model"  # a model name that is not configured
NOT_FOUND = "not_found"  # no such route (or method)
OVERLOADED = "overloaded"  # the model's queue is full: retry after Retry-After seconds
TIMEOUT = "timeout"  # the request ran over request_timeout_s
REPLICA_LOST = "replica_lost"  # the model replica died with the request, and again on the retry: retry later
NOT_LOADED = "model_not_loaded"  # the model's source could not be loaded yet (e.g. the registry is down): retry later
INTERNAL = "internal"  # a bug of ours: the log has the request id and the traceback

STATUS = {MALFORMED_BODY: 400, UNAUTHORIZED: 401, NOT_FOUND: 404, BODY_TIMEOUT: 408, BODY_TOO_LARGE: 413,
          IMAGE_TOO_LARGE: 413, UNSUPPORTED_MEDIA_TYPE: 415, INTERNAL: 500, OVERLOADED: 503, REPLICA_LOST: 503,
          NOT_LOADED: 503, TIMEOUT: 504}


def status_of(reason: str) -> int:
    """The HTTP status of an error reason: 422 for every input the predictor refuses, unless listed above."""
    return STATUS.get(reason, 422)


class ApiError(Exception):
    """A request answered with an error status: `{"error": {"type", "reason", "message"}}`."""

    def __init__(self, reason: str, message: str, *, type_: str = "RequestError", status: int | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.reason, self.message, self.type = reason, message, type_
        self.status = status_of(reason) if status is None else status
        self.headers = headers or {}

    def error(self) -> dict[str, str]:
        return {"type": self.type, "reason": self.reason, "message": self.message}


def validation_error(exc: ValidationError, where: str = "request") -> ApiError:
    """One 4xx for a pydantic error: the first few problems, each with its field path."""
    errors = exc.errors(include_url=False, include_input=False)
    if any(e["type"] in ("json_invalid", "json_type") for e in errors):
        first = next(e for e in errors if e["type"] in ("json_invalid", "json_type"))
        return ApiError(MALFORMED_BODY, f"{where}: the body is not valid JSON ({first['msg']})")
    parts = []
    for e in errors[:5]:
        loc = ".".join(str(p) for p in e["loc"]) or "(body)"
        parts.append(f"{loc}: {'field required' if e['type'] == 'missing' else e['msg']}")
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    reason = MISSING_FIELD if all(e["type"] == "missing" for e in errors) else BAD_TYPE
    return ApiError(reason, f"{where}: " + "; ".join(parts) + more)


# ---------------------------------------------------------------------------------------------- requests

PNG_B64 = "iVBORw0KGgoAAAANSUhEUgAAAAIAAAACCAIAAAD91JpzAAAAFklEQVR4nGM8ISfHwMDAxMDAwMDAAAANBAEIfXHKZgAAAABJRU5ErkJggg=="
_STRICT = ConfigDict(extra="forbid", strict=True)

_IMAGE = Field(None, description="the image: base64 of its bytes (a data: URL prefix is allowed), or a multipart "
                                 "file part named 'image'. Image URLs are never fetched.")
_DECODING = Field(None, description="overrides of the task's decoding settings (GenerationConfig fields: "
                                    + ", ".join(f.name for f in dataclasses.fields(GenerationConfig))
                                    + "), within the server's limits")
_CANDIDATES = Field(None, description="candidate answers or labels, scored by the model (default: the answer set "
                                      "the model was trained with, where its bundle holds one)")


class CaptionItem(BaseModel):
    model_config = _STRICT
    image: str | None = _IMAGE
    decoding: dict[str, Any] | None = _DECODING


class VqaItem(BaseModel):
    model_config = _STRICT
    image: str | None = _IMAGE
    text: str | None = Field(None, description="the question")
    candidates: list[str] | None = _CANDIDATES
    mode: str | None = Field(None, description="open (beam search, the default), trie (beam search over the "
                                               "candidates) or allcand (score every candidate)")
    decoding: dict[str, Any] | None = _DECODING


class GroundingItem(BaseModel):
    model_config = _STRICT
    image: str | None = _IMAGE
    text: str | None = Field(None, description="the phrase to locate")
    decoding: dict[str, Any] | None = _DECODING


class EntailmentItem(BaseModel):
    model_config = _STRICT
    image: str | None = _IMAGE
    text: str | None = Field(None, description="the hypothesis; the answer is yes, no or maybe")


class ClassifyItem(BaseModel):
    model_config = _STRICT
    image: str | None = _IMAGE
    candidates: list[str] | None = Field(None, description="the labels to choose from (default: the model's "
                                                           "label set, where its bundle holds one)")


class TextItem(BaseModel):
    model_config = _STRICT
    text: str | None = Field(None, description="the text (the first sentence of a pair)")
    text2: str | None = Field(None, description="the second sentence of a pair (glue_mnli, glue_rte, ...)")
    decoding: dict[str, Any] | None = _DECODING


class TextToImageItem(BaseModel):
    model_config = _STRICT
    text: str | None = Field(None, description="the caption of the image to generate")
    num_samples: int | None = Field(None, description="images to generate (default 1), ranked by the model's own "
                                                      "image-text matching; at most the server's limits.max_samples")
    top_k: int | None = Field(None, description="sample among the k likeliest codes (default 256, as OFA; 0: all)")
    top_p: float | None = Field(None, description="nucleus sampling threshold in (0, 1] (default 1: off)")
    temperature: float | None = Field(None, description="sampling temperature (default 1.0)")
    seed: int | None = Field(None, description="sampling seed: the same seed and caption give the same images")
    return_codes: bool | None = Field(None, description="also return each image's code grid")


class PredictItem(BaseModel):
    """Any task's fields; a custom task's own columns are allowed beside these."""

    model_config = ConfigDict(extra="allow", strict=True)
    image: str | None = _IMAGE
    text: str | None = None
    text2: str | None = None
    candidates: list[str] | None = _CANDIDATES
    box: list[float] | None = Field(None, description="x0, y0, x1, y1 in image pixels (grounded_caption)")
    mode: str | None = None
    decoding: dict[str, Any] | None = _DECODING


_MODEL = Field(None, description="a configured model's name; default: the model that serves the task")


class CaptionRequest(BaseModel):
    model_config = _STRICT
    model: str | None = _MODEL
    items: list[CaptionItem] = Field(min_length=1)


class VqaRequest(BaseModel):
    model_config = _STRICT
    model: str | None = _MODEL
    items: list[VqaItem] = Field(min_length=1)


class GroundingRequest(BaseModel):
    model_config = _STRICT
    model: str | None = _MODEL
    items: list[GroundingItem] = Field(min_length=1)


class EntailmentRequest(BaseModel):
    model_config = _STRICT
    model: str | None = _MODEL
    items: list[EntailmentItem] = Field(min_length=1)


class ClassifyRequest(BaseModel):
    model_config = _STRICT
    model: str | None = _MODEL
    items: list[ClassifyItem] = Field(min_length=1)


class TextRequest(BaseModel):
    model_config = _STRICT
    task: str = Field(description="a text task: glue_cola, glue_sst2, glue_mnli, glue_rte, glue_mrpc, glue_qqp, "
                                  "glue_qnli, summarization, text_infilling")
    model: str | None = _MODEL
    items: list[TextItem] = Field(min_length=1)


class TextToImageRequest(BaseModel):
    model_config = _STRICT
    model: str | None = _MODEL
    items: list[TextToImageItem] = Field(min_length=1)


class PredictRequest(BaseModel):
    model_config = _STRICT
    task: str = Field(description="any task the model knows, its bundle's custom tasks included")
    model: str | None = _MODEL
    items: list[PredictItem] = Field(min_length=1)


# ---------------------------------------------------------------------------------------------- responses


class ErrorInfo(BaseModel):
    type: str
    reason: str = Field(description="a stable, machine-readable code")
    message: str


class PredictResponse(BaseModel):
    model: str = Field(description="the configured model that answered")
    version: str | None = Field(description="its registry version (null for a plain bundle directory)")
    task: str
    request_id: str
    latency_ms: float = Field(description="server-side time from receiving the request to answering it")
    results: list[dict[str, Any]] = Field(description="one per item, in order: the answer, or {'error': ...} for "
                                                      "that item alone")
    error: ErrorInfo | None = Field(None, description="set (with a 4xx) when no item could be answered")


class ErrorResponse(BaseModel):
    error: ErrorInfo
    request_id: str


class ModelInfo(BaseModel):
    name: str
    source: str = Field(description="the source served, or the one configured while nothing is served yet")
    pending_source: str | None = Field(description="the configured source while it is not the one served (it could "
                                                   "not be loaded yet: see reconfigure_error)")
    registered_name: str | None
    version: str | None
    task: str | None = Field(description="the task the registered version was trained for (its 'task' tag)")
    tasks: list[str] = Field(description="the tasks routed to this model")
    metrics: dict[str, float] = Field(description="validation metrics of the registered version")
    device: str
    reconfigure_error: str | None = Field(description="why pending_source could not be loaded on the replica that "
                                                      "answered (a model it had still serves)")
    stats: dict[str, Any] = Field(description="counters of the replica that answered")


class ModelsResponse(BaseModel):
    models: list[ModelInfo]
    request_id: str


class HealthResponse(BaseModel):
    status: str = Field(description="ok (200): every model serves; unavailable (503): one does not")
    models: dict[str, str | None] = Field(description="model name -> the version served (null for a bundle "
                                                      "directory), 'not loaded', or 'down: <error>'")
    states: dict[str, str] = Field(description="model name -> serving, waiting (not loaded yet: its source is "
                                               "tried again), failed (not loaded, not tried again) or down (its "
                                               "replica did not answer)")
    reasons: dict[str, str] = Field(description="model name -> why it does not serve its configured source (also "
                                                "a switch that has not happened yet)")


# ---------------------------------------------------------------------------------------------- routes


@dataclass(frozen=True)
class Route:
    """One inference endpoint: its path, the task it serves (None: the body's `task`) and its request shape."""

    path: str
    task: str | None
    schema: type[BaseModel]
    summary: str
    example: dict[str, Any]


ROUTES = (
    Route("/v1/caption", "caption", CaptionRequest, "Caption images",
          {"items": [{"image": PNG_B64}, {"image": PNG_B64, "decoding": {"beam_size": 3, "max_len_b": 12}}]}),
    Route("/v1/vqa", "vqa", VqaRequest, "Answer questions about images",
          {"items": [{"image": PNG_B64, "text": "what color is it?"},
                     {"image": PNG_B64, "text": "what color is it?", "candidates": ["red", "blue"],
                      "mode": "allcand"}]}),
    Route("/v1/grounding", "grounding", GroundingRequest, "Locate a phrase (box in image pixels)",
          {"items": [{"image": PNG_B64, "text": "the red square"}]}),
    Route("/v1/entailment", "visual_entailment", EntailmentRequest, "Does the image entail the text (yes/no/maybe)",
          {"items": [{"image": PNG_B64, "text": "the picture is red"}]}),
    Route("/v1/classify", "image_classification", ClassifyRequest, "Choose an image's label among candidates",
          {"items": [{"image": PNG_B64, "candidates": ["red square", "blue circle"]}]}),
    Route("/v1/text-to-image", "text_to_image", TextToImageRequest, "Generate images from a caption (base64 PNGs, "
          "best first)", {"items": [{"text": "a red circle", "num_samples": 2, "seed": 0}]}),
    Route("/v1/text", None, TextRequest, "Text tasks (GLUE, summarization, text infilling)",
          {"task": "glue_mnli", "items": [{"text": "a man runs", "text2": "a person moves"}]}),
    Route("/v1/predict", None, PredictRequest, "Any task, custom instructions included",
          {"task": "grounded_caption", "items": [{"image": PNG_B64, "box": [0, 0, 1, 1]}]}),
)
