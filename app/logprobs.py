"""Log-probabilities as clients read them: each token with its text, bytes and character offset, and the
likeliest alternatives; then in the shapes of OpenAI's legacy completions and of its chat completions."""

import codecs
from dataclasses import dataclass, field


@dataclass
class TokenLogprob:
    id: int
    text: str  # the token's characters, or "bytes:\\xNN..." when its bytes are not whole UTF-8 alone
    raw: bytes
    logprob: float | None  # None: the prompt's first token, which nothing predicts
    top: list = field(default_factory=list)  # TokenLogprobs of the likeliest tokens at this position
    offset: int = 0  # characters of the text before this token


def token_text(raw):
    """OpenAI's convention: a token that ends (or starts) inside a character is shown as its bytes."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def scored(tokenizer, token_id, logprob, top=(), offset=0):
    raw = tokenizer.decode_bytes([token_id])
    alternatives = [scored(tokenizer, i, lp) for i, lp in top]
    return TokenLogprob(token_id, token_text(raw), raw, logprob, alternatives, offset)


def prompt_logprobs(tokenizer, ids, event):
    """A PromptLogprobs event (model.scoring) of the engine as TokenLogprobs, with each token's offset in the prompt."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    out, offset = [], 0
    for token_id, logprob, top in zip(ids, event.logprobs, event.top):
        out.append(scored(tokenizer, token_id, logprob, top, offset))
        offset += len(decoder.decode(tokenizer.decode_bytes([token_id])))
    return out


def legacy(tokens, base=0):
    """OpenAI's legacy completions `logprobs` object; `base`: characters before these tokens' text (the
    echoed prompt's, for the completion's tokens)."""
    return {
        "tokens": [t.text for t in tokens],
        "token_logprobs": [t.logprob for t in tokens],
        "top_logprobs": [None if t.logprob is None else {a.text: a.logprob for a in t.top} for t in tokens],
        "text_offset": [base + t.offset for t in tokens],
    }


def chat(tokens):
    """OpenAI's chat completions `logprobs` object."""

    def entry(t):
        return {"token": t.text, "logprob": t.logprob, "bytes": list(t.raw)}

    return {"content": [{**entry(t), "top_logprobs": [entry(a) for a in t.top]} for t in tokens], "refusal": None}
