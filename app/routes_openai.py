"""OpenAI-compatible POST /v1/completions and /v1/chat/completions, GET /v1/models and GET /v1/models/{name}."""

import math

from fastapi import APIRouter, Request

from app import completions, streaming
from app.chat import chat_prompt
from app.errors import error_responses
from app.protocol import ChatRequest, CompletionRequest
from model.quantize import parameter_count, quantized

router = APIRouter(prefix="/v1")


@router.post(
    "/completions",
    summary="OpenAI-compatible text completion (echo and logprobs score a text)",
    responses={**streaming.STREAMED, **error_responses(400, 401, 403, 404, 422, 429, 503)},
)
async def text_completions(body: CompletionRequest, request: Request):
    served, streams = await request.app.state.service.generate_choices(body)
    if not body.stream:
        return await streaming.unless_disconnected(request, completions.completion(body, served, streams))
    return completions.completion_chunks(body, served, streams, request)


@router.post(
    "/chat/completions",
    summary="OpenAI-compatible chat completion",
    responses={**streaming.STREAMED, **error_responses(400, 401, 403, 404, 422, 429, 503)},
)
async def chat_completions(body: ChatRequest, request: Request):
    service = request.app.state.service
    prompt, stop = chat_prompt(service.get(body.model), body.messages)
    served, streams = await service.generate_choices(body, prompt, stop)
    if not body.stream:
        return await streaming.unless_disconnected(request, completions.chat_completion(body, served, streams))
    return completions.chat_chunks(body, served, streams, request)


# from the checkpoint's metadata; null where a checkpoint does not record one (bits per byte: before they were)
TRAINING_FACTS = ("iter", "tokens_seen", "train_seconds", "best_val_loss", "best_val_bpb", "corpus_sha256")


def json_safe(value):
    """A checkpoint's metadata is JSON that may hold Infinity or NaN, which a JSON response cannot."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def describe(m):
    """OpenAI's model object, and what a user needs to judge the model: its size, context, tokenizer, and
    how well it did on its validation text (bits per byte compare across tokenizers; absent in
    checkpoints saved before they were recorded). `m.model` holds no weights when the engine has a process of its
    own (on the meta device): its config, parameters' count and dtype are all this reads."""
    context = getattr(m.model.config, "context_size", None)  # the LSTM has no fixed context
    return {
        "id": m.name,
        "object": "model",
        "created": int(m.path.stat().st_mtime),
        "owned_by": "quill",
        "model_type": m.meta["model_type"],
        "checkpoint_sha256": m.sha256,
        "parameters": parameter_count(m.model),  # int8 weights (QUILL_QUANTIZE) among them
        "dtype": str(next(m.model.parameters()).dtype).removeprefix("torch."),  # as served (QUILL_DTYPE)
        "quantization": quantized(m.model),  # "int8": its linear weights (QUILL_QUANTIZE), else null
        "context_size": context,
        "tokenizer": {"kind": m.tokenizer.kind, "vocab_size": m.tokenizer.vocab_size},
        "training": {key: json_safe(m.meta.get(key)) for key in TRAINING_FACTS},
        "fine_tuned_from": m.meta.get("init_from"),
        "chat_format": "template" if m.meta.get("chat_template") else "transcript",  # see /v1/chat/completions
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
