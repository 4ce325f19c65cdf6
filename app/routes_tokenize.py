"""POST /tokenize and /detokenize: a model's own tokenizer, for clients that count tokens before they send
(llama.cpp's server and vLLM have both; the bodies take either's field names, and the replies hold both)."""

from fastapi import APIRouter, Request

from app.errors import APIError, error_responses
from app.protocol import DetokenizeRequest, TokenizeRequest

router = APIRouter()


def piece(tokenizer, token):
    """A token's text, or its bytes (a list of numbers, as llama.cpp gives them) when they are not whole UTF-8."""
    raw = tokenizer.decode_bytes([token])
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return list(raw)


@router.post(
    "/tokenize",
    summary="A text's token ids in a model's vocabulary",
    responses=error_responses(400, 401, 403, 404, 422),
)
def tokenize(body: TokenizeRequest, request: Request):
    served = request.app.state.service.get(body.model)
    try:
        ids = served.tokenizer.encode(body.text())
    except ValueError as e:  # characters a character-level vocabulary lacks, or neither or both texts
        raise APIError(422, f"{e} (model {served.name!r})", param="content") from None
    tokens = [{"id": i, "piece": piece(served.tokenizer, i)} for i in ids] if body.with_pieces else ids
    context = getattr(served.model.config, "context_size", None)  # the LSTM has none
    return {"model": served.name, "tokens": tokens, "count": len(ids), "max_model_len": context}


@router.post(
    "/detokenize",
    summary="The text of token ids in a model's vocabulary",
    responses=error_responses(400, 401, 403, 404, 422),
)
def detokenize(body: DetokenizeRequest, request: Request):
    served = request.app.state.service.get(body.model)
    vocab = served.tokenizer.vocab_size
    bad = [i for i in body.tokens if not 0 <= i < vocab]
    if bad:
        raise APIError(
            422, f"tokens: {bad[:5]} not in the vocabulary of model {served.name!r} (0..{vocab - 1})", param="tokens"
        )
    text = served.tokenizer.decode(body.tokens)
    return {"model": served.name, "content": text, "prompt": text}
