"""What each golden case kind runs and compares (see `parity.py` for the runner and tolerances).

Each function takes the case, the loaded model, a `Checks` accumulator and an `Executor` that runs
programs (sequentially, or through the batched engine with `--engine`). Full pipelines run the
recipe programs with a `GoldenObserver` that feeds the stored noise (and, for IRG turn 2, the
stored image-1 pixels in one of its two runs) and records every intermediate the data stores;
component cases run small programs that prefill one thing and read the KV back.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from irg_engine import images
from irg_engine.golden_observer import GoldenObserver
from irg_engine.model.bagel import LoadedModel
from irg_engine.parity import Case, Checks, Executor
from irg_engine.recipes import RecipeParams, program
from irg_engine.recipes.context import encode_latent
from irg_engine.recipes.denoise import StepTrace
from irg_engine.recipes.params import FIRST_IMAGE, REFINE_IMAGE
from irg_engine.recipes.stages import decode, prefill_text, vit_inputs
from irg_engine.recipes.work import PrefillLatent, PrefillVit, ReadKV


def _check_kv(checks: Checks, case: Case, prefix: str, kv) -> None:
    keys, values = kv
    for layer, (k, v) in enumerate(zip(keys, values, strict=True)):
        checks.close(f"{prefix}.layer{layer}.key", k, case.expected[f"{prefix}.layer{layer}.key"])
        checks.close(
            f"{prefix}.layer{layer}.value", v, case.expected[f"{prefix}.layer{layer}.value"]
        )


def text_case(case: Case, model: LoadedModel, checks: Checks, ex: Executor) -> None:
    tok, inputs, e = model.tokenizer, case.spec["inputs"], case.expected
    steps: list[tuple[int, torch.Tensor]] = []
    obs = GoldenObserver({}, {})

    def text_program(env):
        ctx = env.contexts.new("main")
        for name in ("system", "user"):
            yield from prefill_text(env, ctx, tok.segment(inputs[f"{name}_prompt"]))
        kv = yield ReadKV(ctx)
        ids, _ = yield from decode(
            env.contexts,
            ctx,
            tok,
            case.spec["settings"]["max_length"],
            0.0,
            torch.Generator(),
            on_token=lambda t, pos, logits: steps.append((pos, logits.cpu())),
        )
        return kv, ids

    kv, ids = ex.run(text_program, obs)
    for name, (_, seg_ids, start) in zip(("system", "user"), obs.segments, strict=True):
        checks.equal(f"{name}.ids", seg_ids, e[f"{name}.ids"])
        checks.equal(
            f"{name}.position_ids",
            np.arange(start, start + len(seg_ids)),
            e[f"{name}.position_ids"],
        )
    _check_kv(checks, case, "kv_after_prompts", kv)
    checks.equal("decode.ids", ids, e["decode.ids"])
    checks.equal("decode.position_ids", [p for p, _ in steps], e["decode.position_ids"])
    checks.close("decode.logits", torch.stack([lg for _, lg in steps]), e["decode.logits"])


def _block_inputs(model: LoadedModel, inner: torch.Tensor, gen: bool) -> torch.Tensor:
    """The LM input rows of an image block, built as both executors build them."""
    tok = model.tokenizer
    return model.bagel.image_block(inner, gen, (tok.vision_start, tok.vision_end), 0)[0]


def _block_program(item_type, *args):
    """A program that prefills one image block into an empty context and reads its KV."""

    def program(env):
        ctx = env.contexts.new("main")
        yield item_type(ctx, *args)
        kv = yield ReadKV(ctx)
        return kv, env.contexts.rope(ctx)

    return program


def vit_case(case: Case, model: LoadedModel, checks: Checks, ex: Executor) -> None:
    e = case.expected
    image = Image.fromarray(e["image_uint8"])
    checks.equal(
        "vit_input_resized_uint8",
        np.asarray(images.VIT_RULE.resize(image)),
        e["vit_input_resized_uint8"],
    )
    patches, ids = vit_inputs(model.cfg.vit, image)
    checks.equal("vit_position_ids", ids, e["vit_position_ids"])
    patches, ids = patches.to(model.bagel.device), ids.to(model.bagel.device)
    encoded = model.bagel.vit.encode(patches, ids)
    checks.close("vit_encoder_output", encoded, e["vit_encoder_output"])
    checks.close("connector_output", model.bagel.vit.connect(encoded), e["connector_output"])
    feats = model.bagel.embed_vit(patches, ids)
    checks.close("vit_features", feats, e["vit_features"])
    checks.close("llm_block_input", _block_inputs(model, feats, False), e["llm_block_input"])
    kv, rope = ex.run(_block_program(PrefillVit, patches, ids))
    # A block shares the position its context had (0 here) and advances it by one.
    checks.equal("llm_position_ids", np.full(kv[0][0].shape[0], rope - 1), e["llm_position_ids"])
    _check_kv(checks, case, "kv_after_vit_block", kv)


def vae_case(case: Case, model: LoadedModel, checks: Checks, ex: Executor) -> None:
    e = case.expected
    x = images.pil_to_tensor(Image.fromarray(e["image_uint8"]))[None].to(model.bagel.device)
    checks.close("encoder_moments", model.vae.encode_moments(x), e["encoder_moments"])
    latent = model.vae.encode(x)
    checks.close("latent", latent, e["latent"])
    decoded = model.vae.decode(latent)
    checks.close("decoded", decoded, e["decoded"])
    checks.pixels("decoded_uint8", images.tensor_to_uint8(decoded), e["decoded_uint8"])
    p = model.cfg.latent_patch_size
    tokens = images.patchify_latent(latent, p)
    checks.close("latent_tokens", tokens, e["latent_tokens"])
    h, w = latent.shape[-2] // p, latent.shape[-1] // p
    pos = images.latent_position_ids(h, w, model.cfg.max_latent_size)
    checks.equal("vae_block.latent_position_ids", pos, e["vae_block.latent_position_ids"])
    rows = model.bagel.context_latent_rows(latent)
    checks.close("vae_block.llm_input", _block_inputs(model, rows, True), e["vae_block.llm_input"])
    kv, rope = ex.run(_block_program(PrefillLatent, latent))
    checks.equal(
        "vae_block.position_ids", np.full(kv[0][0].shape[0], rope - 1), e["vae_block.position_ids"]
    )
    _check_kv(checks, case, "vae_block.kv", kv)


def _zeros_if_none(v: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(like) if v is None else v


def _check_steps(
    checks: Checks, e: dict, prefix: str, steps: list[StepTrace], kinds, label: str = ""
) -> None:
    checks.equal(
        f"{label}{prefix}.t", np.array([s.t for s in steps], dtype=np.float32), e[f"{prefix}.t"]
    )
    flags = {
        "text_cfg_active": [int(s.v_text_free is not None) for s in steps],
        "img_cfg_active": [int(s.v_img_free is not None) for s in steps],
    }
    for name, values in flags.items():
        if f"{prefix}.{name}" in e:
            checks.equal(f"{label}{prefix}.{name}", values, e[f"{prefix}.{name}"])
    for kind in kinds:
        ours = torch.stack([_zeros_if_none(getattr(s, kind), s.v_cond) for s in steps])
        checks.close(f"{label}{prefix}.{kind}", ours, e[f"{prefix}.{kind}"])


def _settings(spec: dict, prefix: dict | None = None) -> dict:
    s = prefix or spec
    return dict(
        cfg_text_scale=s["cfg_text_scale"],
        cfg_img_scale=s["cfg_img_scale"],
        cfg_interval=tuple(s["cfg_interval"]),
        cfg_renorm_type=s["cfg_renorm_type"],
        cfg_renorm_min=s["cfg_renorm_min"],
    )


def t2i_case(case: Case, model: LoadedModel, checks: Checks, ex: Executor) -> None:
    e, spec, s = case.expected, case.spec, case.spec["settings"]
    h, w = spec["inputs"]["image_hw"]
    params = RecipeParams(
        spec["inputs"]["prompt"],
        recipe="t2i",
        width=w,
        height=h,
        num_timesteps=s["num_timesteps"],
        timestep_shift=s["timestep_shift"],
        **_settings(s),
    )
    obs = GoldenObserver({1: case.tensor("noise")}, {})
    ex.run(lambda env: program(params, env), obs)
    checks.equal("prompt_ids", obs.segments[0][1], e["prompt_ids"])
    _check_steps(checks, e, "steps", obs.steps[1], ("x_t", "v_cond", "v_text_free", "v"))
    checks.close("final_latent_tokens", obs.tokens[1], e["final_latent_tokens"])
    checks.close(
        "final_latent", images.unpatchify_latent(obs.tokens[1], h // 16, w // 16), e["final_latent"]
    )
    checks.close("decoded", obs.decoded[1], e["decoded"])
    checks.pixels("image_out_uint8", obs.images[1].pixels, e["image_out_uint8"])


def edit_case(case: Case, model: LoadedModel, checks: Checks, ex: Executor) -> None:
    e, spec, s = case.expected, case.spec, case.spec["settings"]
    image = Image.fromarray(e["image_uint8"])
    params = RecipeParams(
        spec["inputs"]["instruction"],
        recipe="edit",
        image=image,
        num_timesteps=s["num_timesteps"],
        timestep_shift=s["timestep_shift"],
        **_settings(s),
    )
    checks.close("vae_context_latent", encode_latent(model, image), e["vae_context_latent"])
    obs = GoldenObserver({1: case.tensor("noise")}, {})
    ex.run(lambda env: program(params, env), obs)
    checks.equal("prompt_ids", obs.segments[0][1], e["prompt_ids"])
    steps = obs.steps[1]
    checks.equal("steps.t", np.array([st.t for st in steps], dtype=np.float32), e["steps.t"])
    for kind in ("x_t", "v_cond", "v_text_free", "v_img_free", "v"):
        checks.close(f"step0.{kind}", getattr(steps[0], kind), e[f"step0.{kind}"])
    checks.close("steps.v_norm", torch.stack([st.v.norm() for st in steps]), e["steps.v_norm"])
    checks.close(
        "steps.x_t_norm", torch.stack([st.x_t.norm() for st in steps]), e["steps.x_t_norm"]
    )
    checks.close("final_latent_tokens", obs.tokens[1], e["final_latent_tokens"])
    checks.pixels("image_out_uint8", obs.images[1].pixels, e["image_out_uint8"])


def irg_case(case: Case, model: LoadedModel, checks: Checks, ex: Executor) -> None:
    e, spec, s = case.expected, case.spec, case.spec["settings"]
    h, w = spec["inputs"]["resolution"]
    stored_image1 = e["image1.uint8"]
    image1_ctx = Image.fromarray(stored_image1)
    checks.close(
        "image1_context.vae_latent",
        encode_latent(model, image1_ctx),
        e["image1_context.vae_latent"],
    )
    patches, vit_ids = vit_inputs(model.cfg.vit, image1_ctx)
    checks.equal("image1_context.vit_position_ids", vit_ids, e["image1_context.vit_position_ids"])
    checks.close(
        "image1_context.vit_features",
        model.bagel.embed_vit(patches.to(model.bagel.device), vit_ids.to(model.bagel.device)),
        e["image1_context.vit_features"],
    )
    noises = {1: case.tensor("image1.noise"), 2: case.tensor("image2.noise")}
    # The IRG recipe applies its first-image and refine-image defaults per turn; the case must
    # use exactly those, since one set of request parameters cannot express two.
    for turn, defaults in (("turn1", FIRST_IMAGE), ("turn2", REFINE_IMAGE)):
        t = s[turn]
        if (
            (t["cfg_img_scale"], tuple(t["cfg_interval"]), t["cfg_renorm_type"])
            != (defaults["img_scale"], defaults["interval"], defaults["renorm"])
            or t["cfg_text_scale"] != s["turn1"]["cfg_text_scale"]
            or t["cfg_renorm_min"] != 0
        ):
            checks.failures.append(f"{turn} settings differ from the recipe defaults: {t}")
            return
    params = RecipeParams(
        spec["inputs"]["prompt"],
        recipe="irg",
        width=w,
        height=h,
        num_timesteps=s["num_timesteps"],
        timestep_shift=s["timestep_shift"],
        max_think_tokens=s["max_length"],
        temperature=0.0,
        cfg_text_scale=s["turn1"]["cfg_text_scale"],
    )
    for label, pixels in (("", {1: stored_image1}), ("own_image1:", {})):
        obs = GoldenObserver(noises, pixels)
        ex.run(lambda env: program(params, env), obs)
        _check_irg_run(checks, e, obs, label)


def _check_irg_run(checks: Checks, e: dict, obs: GoldenObserver, label: str) -> None:
    for r in (1, 2):
        _, generated = obs.thinks[r]
        checks.equal(f"{label}think{r}.generated_ids", generated, e[f"think{r}.generated_ids"])
        steps = obs.decode_steps[r]
        checks.equal(
            f"{label}think{r}.position_ids", [p for p, _ in steps], e[f"think{r}.position_ids"]
        )
        checks.close(
            f"{label}think{r}.logits", torch.stack([lg for _, lg in steps]), e[f"think{r}.logits"]
        )
        kinds = ("x_t", "v_cond", "v_text_free", "v") + (("v_img_free",) if r == 2 else ())
        _check_steps(checks, e, f"image{r}.steps", obs.steps[r], kinds, label)
        checks.close(
            f"{label}image{r}.final_latent_tokens",
            obs.tokens[r],
            e[f"image{r}.final_latent_tokens"],
        )
        checks.close(f"{label}image{r}.decoded", obs.decoded[r], e[f"image{r}.decoded"])
        checks.pixels(f"{label}image{r}.uint8", obs.images[r].pixels, e[f"image{r}.uint8"])
    names = {
        "main": ["system", "prompt", "think1", "think2"],
        "image_free": ["system", "prompt", "think1", "think2"],
    }
    for context, segment_names in names.items():
        segs = [(ids, start) for ctx, ids, start in obs.segments if ctx == context]
        if context == "image_free":  # it forks main after think 1, sharing three segments
            main = [(ids, start) for ctx, ids, start in obs.segments if ctx == "main"]
            segs = main[:3] + segs
        prefix = "main" if context == "main" else "cfgimg"
        for name, (ids, start) in zip(segment_names, segs, strict=True):
            checks.equal(f"{label}{prefix}.{name}.ids", ids, e[f"{prefix}.{name}.ids"])
            checks.equal(
                f"{label}{prefix}.{name}.position_ids",
                np.arange(start, start + len(ids)),
                e[f"{prefix}.{name}.position_ids"],
            )


CASES = {
    "text": text_case,
    "vit": vit_case,
    "vae": vae_case,
    "t2i": t2i_case,
    "edit": edit_case,
    "irg": irg_case,
}
