"""OpenAI-compatible POST /v1/completions, GET /v1/models and GET /v1/models/{name}."""

import math

from fastapi import APIRouter, Request

from app import streaming
from app.errors import error_responses
from app.protocol import CompletionRequest

router = APIRouter(prefix="/v1")


@router.post(
    "/completions",
    summary="OpenAI-compatible text completion",
    responses={**streaming.STREAMED, **error_responses(400, 401, 403, 404, 422, 429, 503)},
)
async def completions(body: CompletionRequest, request: Request):
    served, events = request.app.state.service.generate(body)
    if not body.stream:
        return await streaming.completion(events, served)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return streaming.completion_chunks(events, request, served, include_usage)


# from the checkpoint's metadata; null where a checkpoint does not record one (bits per byte: before they were)
TRAINING_FACTS = ("iter", "tokens_seen", "train_seconds", "best_val_loss", "best_val_bpb", "corpus_sha256")


def json_safe(value):
    """A checkpoint's metadata is JSON that may hold Infinity or NaN, which a JSON response cannot."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def describe(m):
    """OpenAI's model object, and what a user needs to judge the model: its size, context, tokenizer, and
    how well it did on its validation text (bits per byte compare across tokenizers; absent in
    checkpoints saved before they were recorded)."""
    context = getattr(m.model.config, "context_size", None)  # the LSTM has no fixed context
    return {
        "id": m.name,
        "object": "model",
        "created": int(m.path.stat().st_mtime),
        "owned_by": "quill",
        "model_type": m.meta["model_type"],
        "checkpoint_sha256": m.sha256,
        "parameters": sum(p.numel() for p in m.model.parameters()),
        "context_size": context,
        "tokenizer": {"kind": m.tokenizer.kind, "vocab_size": m.tokenizer.vocab_size},
        "training": {key: json_safe(m.meta.get(key)) for key in TRAINING_FACTS},
        "fine_tuned_from": m.meta.get("init_from"),
        "imported_from": m.meta.get("imported_from"),
    }


@router.get("/models", summary="The models this server serves", responses=error_responses(401))
async def models(request: Request):
    return {"object": "list", "data": [describe(m) for m in request.app.state.service.models.values()]}


@router.get(
    "/models/{name}", summary="One served model: what it is and how it was trained", responses=error_responses(401, 404)
)
async def model(name: str, request: Request):
    return describe(request.app.state.service.get(name))
