"""The files of a BAGEL-layout checkpoint folder: finding them, reading the JSON configs and the
safetensors headers and tensors. Every problem is one `CheckpointError` naming the file.

`find_files` -> `CheckpointFiles` (paths and parsed configs); `weight_headers` / `tensor_headers`
give names, shapes and dtypes without reading the data; `iter_tensors` reads the tensors from the
memory-mapped files one at a time (`checkpoint.load`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from irg_engine.checkpoint_checks import CheckpointError

WEIGHT_FILES = ("ema.safetensors", "ema_bf16.safetensors", "model.safetensors")
INFO_FILE = "tiny_model_info.json"  # not published: written by tiny.py with the hard-coded values


@dataclass
class CheckpointFiles:
    root: Path
    bagel: list[Path]
    ae: Path
    llm_config: dict
    vit_config: dict
    info: dict = field(default_factory=dict)

    @property
    def weights_name(self) -> str:
        """The BAGEL weight files, as messages name them."""
        return ", ".join(p.name for p in self.bagel)


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path.parent}: missing file {path.name}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    except OSError as e:
        raise CheckpointError(f"{path}: unreadable ({e})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(value).__name__}")
    return value


def find_files(root: Path) -> CheckpointFiles:
    root = Path(root)
    if not root.is_dir():
        what = "is not a folder" if root.exists() else "does not exist"
        raise CheckpointError(f"checkpoint folder {root} {what}")
    llm, vit = _read_json(root / "llm_config.json"), _read_json(root / "vit_config.json")
    bagel = [root / n for n in WEIGHT_FILES if (root / n).is_file()][:1]
    if not bagel:
        indexes = sorted(root.glob("*.safetensors.index.json"))
        if not indexes:
            raise CheckpointError(
                f"{root}: missing file ema.safetensors (or ema_bf16.safetensors, or shards with a "
                "*.safetensors.index.json)"
            )
        weight_map = _read_json(indexes[0]).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{indexes[0]}: no weight_map naming the shards")
        names = sorted(set(weight_map.values()))
        if outside := [n for n in names if not isinstance(n, str) or Path(n).name != n]:
            raise CheckpointError(f"{indexes[0]}: shards must be files in the folder: {outside}")
        bagel = [root / n for n in names]
        for shard in bagel:
            if not shard.is_file():
                raise CheckpointError(
                    f"{root}: missing shard {shard.name} listed in {indexes[0].name}"
                )
    ae = root / "ae.safetensors"
    if not ae.is_file():
        raise CheckpointError(f"{root}: missing file ae.safetensors")
    if not (root / "tokenizer.json").is_file():
        raise CheckpointError(f"{root}: missing file tokenizer.json")
    info = _read_json(root / INFO_FILE) if (root / INFO_FILE).is_file() else {}
    return CheckpointFiles(root, bagel, ae, llm, vit, info)


def tensor_headers(path: Path) -> dict[str, tuple[list[int], str]]:
    try:
        with safe_open(str(path), framework="pt") as f:
            names = f.keys()  # safe_open is not iterable itself
            return {
                k: (list(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in names
            }
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: unreadable safetensors file ({e})") from None


def weight_headers(files: CheckpointFiles) -> dict[str, tuple[list[int], str]]:
    """The BAGEL weights' headers over every shard; a tensor in two shards is an error (which
    copy would load would depend on the read order)."""
    headers: dict[str, tuple[list[int], str]] = {}
    owner: dict[str, str] = {}
    for shard in files.bagel:
        for name, header in tensor_headers(shard).items():
            if name in owner:
                raise CheckpointError(
                    f"{files.root}: {name} is in both {owner[name]} and {shard.name}"
                )
            headers[name], owner[name] = header, shard.name
    return headers


def iter_tensors(path: Path, device: str) -> Iterator[tuple[str, torch.Tensor]]:
    try:
        with safe_open(str(path), framework="pt", device=device) as f:
            names = f.keys()  # safe_open is not iterable itself
            for k in names:
                yield k, f.get_tensor(k)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: unreadable safetensors file ({e})") from None
