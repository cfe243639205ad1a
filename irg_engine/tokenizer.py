"""Text <-> token ids for BAGEL-layout checkpoints: segments, special tokens, streaming decode.

Owns the one `tokenizers.Tokenizer` (the checkpoint's `tokenizer.json`, a Qwen2 byte-level BPE)
and the text rules the published reference applies around it:

- prompts enter the model as segments `[<|im_start|>] + encode(text) + [<|im_end|>]`, no roles;
- a generated think (`<|im_start|>` then sampled ids) becomes text by `decode` (special tokens
  as their literal strings, invalid UTF-8 as U+FFFD) cut between `<|im_start|>` and
  `<|im_end|>` (`think_text`); the reference re-encodes that text as the next segment;
- streamed text comes from `IncrementalDecoder`, whose deltas join to exactly `decode(ids)`.

Special token ids are looked up by their strings, never hard-coded, so the tiny golden tokenizer
(ids 507-511) and the real Qwen2.5 one (151643+) both work.
"""

from __future__ import annotations

import codecs
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import tokenizers
from tokenizers import decoders

from irg_engine.qwen_vocab import bytes_to_unicode

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
ENDOFTEXT = "<|endoftext|>"

TOKENIZER_FILE = "tokenizer.json"


class Tokenizer:
    """A checkpoint's byte-level BPE tokenizer plus BAGEL's segment and think-text rules."""

    def __init__(self, hf: tokenizers.Tokenizer) -> None:
        if not isinstance(hf.decoder, decoders.ByteLevel):
            # Streaming decode works on token bytes, which only a byte-level decoder defines.
            raise ValueError(f"expected a ByteLevel decoder, got {type(hf.decoder).__name__}")
        self.hf = hf
        self.im_start = self._special_id(IM_START)
        self.im_end = self._special_id(IM_END)
        self.vision_start = self._special_id(VISION_START)
        self.vision_end = self._special_id(VISION_END)
        self.endoftext = self._special_id(ENDOFTEXT)
        self.vocab_size: int = hf.get_vocab_size(with_added_tokens=True)
        # One past the largest id: ids need not be dense, and an id past the embedding rows
        # would fail at request time.
        self.id_limit: int = max(hf.get_vocab(with_added_tokens=True).values(), default=-1) + 1
        self._byte_of = {c: b for b, c in bytes_to_unicode().items()}
        self._bytes_cache: dict[int, bytes] = {}

    @classmethod
    def from_dir(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Load `tokenizer.json` from a checkpoint folder."""
        file = Path(path) / TOKENIZER_FILE
        if not file.is_file():
            raise FileNotFoundError(
                f"{file} not found: a checkpoint folder needs the fast tokenizer {TOKENIZER_FILE}"
                " (for the Qwen2.5 vocabulary, irg_engine.qwen_vocab.write_qwen_tokenizer writes"
                " one)"
            )
        return cls(tokenizers.Tokenizer.from_file(str(file)))

    def _special_id(self, token: str) -> int:
        id_ = self.hf.token_to_id(token)
        if id_ is None:
            raise ValueError(f"tokenizer has no {token!r} token; BAGEL-layout models need it")
        return id_

    def encode(self, text: str) -> list[int]:
        """Ids of `text`, without added wrappers; special-token strings in it become their ids."""
        return self.hf.encode(text, add_special_tokens=False).ids

    def segment(self, text: str) -> list[int]:
        """A text segment as the model sees it: `<|im_start|> text <|im_end|>`."""
        return [self.im_start, *self.encode(text), self.im_end]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`: special tokens literally, invalid UTF-8 as U+FFFD, unknown ids dropped."""
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=False)

    def think_text(self, generated_ids: Iterable[int]) -> str:
        """The text of a generated think, as the reference cuts it before re-encoding.

        Generated ids start with the `<|im_start|>` start token; the text is what lies between
        it and the first `<|im_end|>` (the stop token is normally not appended, but a literal
        one can still appear in the decoded string).
        """
        text = self.decode(generated_ids).split(IM_END)[0]
        parts = text.split(IM_START)
        return parts[1] if len(parts) > 1 else parts[0]

    def token_bytes(self, id_: int) -> bytes:
        """The bytes one token contributes to a decode (b"" for an id the tokenizer lacks)."""
        cached = self._bytes_cache.get(id_)
        if cached is not None:
            return cached
        token = self.hf.id_to_token(id_)
        if token is None:
            data = b""
        elif all(c in self._byte_of for c in token):
            data = bytes(self._byte_of[c] for c in token)
        else:
            # The ByteLevel decoder passes a token with characters outside its table through as
            # UTF-8 (an added token such as a non-Latin marker).
            data = token.encode("utf-8")
        self._bytes_cache[id_] = data
        return data

    def incremental_decoder(self) -> IncrementalDecoder:
        """A fresh streaming decoder for one generated sequence."""
        return IncrementalDecoder(self)


class IncrementalDecoder:
    """Turns ids fed one at a time into text deltas whose concatenation is `decode(all ids)`.

    A byte-level decode is one lossy UTF-8 decode of the tokens' concatenated bytes, so a
    streaming UTF-8 decoder over the same bytes gives the same text. It holds back the bytes of a
    character split across tokens until the character completes (or turns out invalid, giving
    U+FFFD as the full decode does); `flush` ends the stream. Work per token is O(token length).
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, id_: int) -> str:
        """Add one id; return the text it completes (possibly "")."""
        return self._utf8.decode(self._tokenizer.token_bytes(int(id_)))

    def push_many(self, ids: Sequence[int]) -> str:
        """Add several ids; return the text they complete."""
        return "".join(self.push(i) for i in ids)

    def flush(self) -> str:
        """End the stream: held-back bytes of an unfinished character become U+FFFD."""
        rest = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return rest
