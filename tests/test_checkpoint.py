"""Loading BAGEL-layout folders: dtypes, clear errors for broken folders, memory, inspect."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

from irg_engine import checkpoint
from irg_engine.checkpoint import CheckpointError
from irg_engine.tiny import write_tiny


@pytest.fixture
def golden_copy(golden, tmp_path):
    out = tmp_path / "ckpt"
    shutil.copytree(golden / "checkpoint", out)
    return out


def test_bf16_and_fp32_files_load_to_the_same_model(golden_copy):
    bf16 = checkpoint.load(golden_copy)
    state = load_file(str(golden_copy / "ema.safetensors"))
    (golden_copy / "ema.safetensors").unlink()
    save_file({k: v.float() for k, v in state.items()}, str(golden_copy / "ema_bf16.safetensors"))
    fp32 = checkpoint.load(golden_copy)
    for (name, a), (_, b) in zip(
        bf16.bagel.state_dict().items(), fp32.bagel.state_dict().items(), strict=True
    ):
        assert a.dtype == torch.float32
        assert torch.equal(a, b), name
    half = checkpoint.load(golden_copy, dtype=torch.bfloat16)
    assert half.bagel.dtype == torch.bfloat16


def test_sharded_weights_with_index_load(golden_copy):
    state = load_file(str(golden_copy / "ema.safetensors"))
    (golden_copy / "ema.safetensors").unlink()
    names = sorted(state)
    shards = {
        "ema-00001-of-00002.safetensors": names[:50],
        "ema-00002-of-00002.safetensors": names[50:],
    }
    for fname, keys in shards.items():
        save_file({k: state[k] for k in keys}, str(golden_copy / fname))
    index = {"weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (golden_copy / "ema.safetensors.index.json").write_text(json.dumps(index))
    model = checkpoint.load(golden_copy)
    assert model.cfg.lm.num_layers == 2


def test_missing_file_is_named(golden_copy):
    (golden_copy / "ae.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"missing file ae\.safetensors"):
        checkpoint.load(golden_copy)
    (golden_copy / "vit_config.json").unlink()
    with pytest.raises(CheckpointError, match=r"missing file vit_config\.json"):
        checkpoint.load(golden_copy)


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        checkpoint.load(tmp_path / "nothing")


def _rewrite(path, change):
    state = load_file(str(path))
    change(state)
    save_file(state, str(path))


def test_renamed_tensor_is_reported_as_missing_and_unexpected(golden_copy):
    def rename(state):
        state["language_model.model.norm_typo.weight"] = state.pop(
            "language_model.model.norm.weight"
        )

    _rewrite(golden_copy / "ema.safetensors", rename)
    with pytest.raises(CheckpointError) as err:
        checkpoint.load(golden_copy)
    msg = str(err.value)
    assert "1 missing: lm.norms.0.weight" in msg
    assert "1 unexpected: language_model.model.norm_typo.weight" in msg


def test_wrong_shape_is_reported(golden_copy):
    def reshape(state):
        state["vae2llm.weight"] = torch.zeros(64, 32, dtype=torch.bfloat16)

    _rewrite(golden_copy / "ema.safetensors", reshape)
    with pytest.raises(
        CheckpointError,
        match=r"1 mis-shaped: vae2llm.weight \[64, 32\] "
        r"\(expected \[64, 64\]\)",
    ):
        checkpoint.load(golden_copy)


def test_many_missing_tensors_are_counted_and_truncated(golden_copy):
    _rewrite(
        golden_copy / "ae.safetensors",
        lambda s: [s.pop(k) for k in [k for k in s if k.startswith("decoder.up.")]],
    )
    with pytest.raises(CheckpointError, match=r"ae.safetensors: \d+ missing: .* and \d+ more"):
        checkpoint.load(golden_copy)


def test_truncated_safetensors_is_a_clear_error(golden_copy):
    path = golden_copy / "ema.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"ema\.safetensors: unreadable safetensors file"):
        checkpoint.load(golden_copy)


def test_conv_patch_embedding_is_accepted(golden_copy, golden_model):
    def to_conv(state):
        w = state["vit_model.vision_model.embeddings.patch_embedding.weight"]  # [32, 14*14*3]
        state["vit_model.vision_model.embeddings.patch_embedding.weight"] = (
            w.reshape(32, 14, 14, 3).permute(0, 3, 1, 2).contiguous()
        )

    _rewrite(golden_copy / "ema.safetensors", to_conv)
    model = checkpoint.load(golden_copy)
    assert torch.equal(
        model.bagel.vit.patch_embed.weight, golden_model.bagel.vit.patch_embed.weight
    )


def test_inspect_cli(golden):
    proc = subprocess.run(
        [sys.executable, "-m", "irg_engine.checkpoint", "inspect", str(golden / "checkpoint")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "ema.safetensors: 111 tensors" in proc.stdout
    assert "hidden 64, 2 layers, 4 heads / 2 kv heads of 16" in proc.stdout
    assert "2 layers used" in proc.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "irg_engine.checkpoint", "inspect", "/nonexistent"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 1 and "error:" in bad.stderr and "Traceback" not in bad.stderr


def test_inspect_names_a_mis_shaped_tensor(golden_copy):
    _rewrite(
        golden_copy / "ema.safetensors",
        lambda s: s.update({"vae2llm.weight": torch.zeros(64, 32, dtype=torch.bfloat16)}),
    )
    proc = subprocess.run(
        [sys.executable, "-m", "irg_engine.checkpoint", "inspect", str(golden_copy)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert "1 mis-shaped: vae2llm.weight [64, 32]" in proc.stderr


def test_tiny_checkpoint_round_trips_in_published_layout(tiny_dir, tiny_model, golden):
    golden_names = set(load_file(str(golden / "checkpoint" / "ema.safetensors")))
    tiny_names = set(load_file(str(tiny_dir / "ema.safetensors")))
    assert tiny_names == golden_names
    assert tiny_model.random_weights and "random" in tiny_model.name
    assert tiny_model.tokenizer.im_start == 151644 and tiny_model.tokenizer.vision_end == 151653


def test_loading_holds_one_copy_of_the_weights(golden, tmp_path):
    """Peak anonymous memory while loading stays near the size of the loaded weights."""
    ckpt = tmp_path / "big"
    write_tiny(ckpt, tokenizer_from=golden / "checkpoint")
    cfg = json.loads((ckpt / "llm_config.json").read_text())
    cfg.update(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
    )
    (ckpt / "llm_config.json").write_text(json.dumps(cfg))
    script = textwrap.dedent(f"""
        import threading, time, torch
        from irg_engine import checkpoint
        from irg_engine.config import LMConfig
        from irg_engine.model.bagel import Bagel
        from irg_engine.tiny import tiny_config
        from irg_engine.published_names import published_names
        from safetensors.torch import save_file
        cfg = tiny_config(512)
        cfg.lm = LMConfig(hidden_size=1024, num_layers=4, num_heads=8, num_kv_heads=2,
                          intermediate_size=4096, vocab_size=512)
        with torch.device("meta"):
            model = Bagel(cfg)
        names = published_names(cfg)
        state = {{names[k]: torch.full(v.shape, 0.01, dtype=torch.bfloat16)
                 for k, v in model.state_dict().items()}}
        save_file(state, "{ckpt}/ema.safetensors")
        del state, model

        def anon():
            for line in open("/proc/self/status"):
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
        peak = [anon()]
        base = peak[0]
        done = False
        def sample():
            while not done:
                peak[0] = max(peak[0], anon())
                time.sleep(0.001)
        t = threading.Thread(target=sample); t.start()
        m = checkpoint.load("{ckpt}", dtype=torch.float32)
        done = True; t.join()
        size = sum(p.numel() * p.element_size() for p in m.bagel.parameters())
        print(size, peak[0] - base)
    """)
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    size, peak = map(int, proc.stdout.split())
    assert size > 400e6  # a few hundred MB of float32 weights
    print(f"loading peaked at {peak / size:.2f}x the weights")
    assert peak < 1.25 * size, f"loading peaked at {peak / size:.2f}x the weights"


def test_non_finite_and_integer_weights_are_refused(golden_copy):
    def poison(state):
        state["vae2llm.weight"][0, 0] = float("nan")

    _rewrite(golden_copy / "ema.safetensors", poison)
    with pytest.raises(CheckpointError, match=r"ema\.safetensors: 1 tensors hold NaN or Inf"):
        checkpoint.load(golden_copy)
    _rewrite(golden_copy / "ema.safetensors", lambda s: s["vae2llm.weight"].nan_to_num_(0.0))

    def to_int(state):
        state["encoder.conv_in.bias"] = state["encoder.conv_in.bias"].to(torch.int32)

    _rewrite(golden_copy / "ae.safetensors", to_int)
    with pytest.raises(
        CheckpointError, match=r"not floating point: encoder\.conv_in\.bias \(I32\)"
    ):
        checkpoint.load(golden_copy)


def _edit_json(path, change):
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_a_layer_count_the_weights_do_not_hold_fails_before_building(golden_copy):
    _edit_json(golden_copy / "llm_config.json", lambda c: c.update(num_hidden_layers=10**6))
    with pytest.raises(CheckpointError, match=r"llm_config\.json asks for 1000000 layers"):
        checkpoint.load(golden_copy)  # at once: no million-layer module is built first
    _edit_json(golden_copy / "llm_config.json", lambda c: c.update(num_hidden_layers=2))
    _edit_json(golden_copy / "vit_config.json", lambda c: c.update(num_hidden_layers=10**5))
    with pytest.raises(CheckpointError, match=r"vit_config\.json asks for 99999 layers"):
        checkpoint.load(golden_copy)


@pytest.mark.parametrize(
    ("key", "value"),
    [("rope_theta", 0), ("num_key_value_heads", 0), ("num_attention_heads", None)],
)
def test_absurd_config_values_are_a_checkpoint_error(golden_copy, key, value):
    _edit_json(golden_copy / "llm_config.json", lambda c: c.update({key: value}))
    with pytest.raises(CheckpointError, match="invalid config"):
        checkpoint.load(golden_copy)


def test_malformed_side_files_are_named(golden_copy):
    (golden_copy / "tiny_model_info.json").write_text("[]")
    with pytest.raises(CheckpointError, match=r"tiny_model_info\.json: expected a JSON object"):
        checkpoint.load(golden_copy)
    (golden_copy / "tiny_model_info.json").unlink()
    (golden_copy / "tokenizer.json").write_text("{")
    with pytest.raises(CheckpointError, match=r"tokenizer\.json: cannot load"):
        checkpoint.load(golden_copy)


def test_a_tokenizer_id_past_the_embedding_rows_is_refused(golden_copy):
    # As many ids as rows, but one of them past the last row: every prompt using it would fail.
    def move(tok):
        vocab = tok["model"]["vocab"]
        vocab[next(iter(vocab))] = 10**6

    _edit_json(golden_copy / "tokenizer.json", move)
    with pytest.raises(CheckpointError, match="ids up to 1000000"):
        checkpoint.load(golden_copy)


def test_shards_must_be_distinct_files_in_the_folder(golden_copy):
    state = load_file(str(golden_copy / "ema.safetensors"))
    (golden_copy / "ema.safetensors").unlink()
    names = sorted(state)
    shards = {"a.safetensors": names[:60], "b.safetensors": names[50:]}  # 10 in both
    for fname, keys in shards.items():
        save_file({k: state[k] for k in keys}, str(golden_copy / fname))
    index = golden_copy / "ema.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {k: f for f, ks in shards.items() for k in ks}}))
    with pytest.raises(CheckpointError, match=r"is in both a\.safetensors and b\.safetensors"):
        checkpoint.load(golden_copy)
    index.write_text(json.dumps({"weight_map": {names[0]: "../elsewhere.safetensors"}}))
    with pytest.raises(CheckpointError, match="shards must be files in the folder"):
        checkpoint.load(golden_copy)


def test_a_file_for_a_folder_is_named_as_such(golden_copy):
    with pytest.raises(CheckpointError, match="is not a folder"):
        checkpoint.load(golden_copy / "ema.safetensors")
