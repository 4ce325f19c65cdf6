"""Token ids to text deltas that are safe to send: whole UTF-8 characters only, and nothing
that is, or might become, a stop string."""

import codecs


class TextStream:
    def __init__(self, tokenizer, stop=()):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        # holds back the bytes of a character that is not complete yet; invalid bytes become U+FFFD
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.held = ""  # decoded, but possibly the start of a stop string
        self.text = ""  # everything sent so far
        self.stopped = False

    def push(self, token_id):
        """Add one token; return the text that may be sent now ('' while held back)."""
        if self.stopped:
            return ""
        return self._release(self.held + self.decoder.decode(self.tokenizer.decode_bytes([token_id])))

    def flush(self):
        """The generation ended without a stop string: send whatever is held."""
        if self.stopped:
            return ""
        out = self.held + self.decoder.decode(b"", final=True)
        self.held = ""
        self.text += out
        return out

    def _release(self, pending):
        hits = [(pending.find(s), s) for s in self.stop if s in pending]
        if hits:
            cut = min(hits)[0]
            self.stopped = True
            self.held = ""
            self.text += pending[:cut]
            return pending[:cut]
        keep = max(
            (k for s in self.stop for k in range(1, min(len(s), len(pending) + 1)) if pending.endswith(s[:k])),
            default=0,
        )
        out, self.held = pending[: len(pending) - keep], pending[len(pending) - keep :]
        self.text += out
        return out
