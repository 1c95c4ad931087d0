"""Model files that are not what they should be get typed errors that say what to do."""

import struct

import pytest
import torch
from safetensors.torch import save_file

from sdcore.checkpoints import ensure_model_file, inspect_model
from sdcore.errors import CheckpointError, ModelNotFound, UnsafeCheckpoint, WrongModelType


def test_missing_path(tmp_path):
    with pytest.raises(ModelNotFound, match="not found: no such file or folder"):
        inspect_model(tmp_path / "nope.safetensors")


def test_folder_without_model_index(tmp_path):
    with pytest.raises(ModelNotFound, match="no model_index.json"):
        inspect_model(tmp_path)


def test_truncated_safetensors(tmp_path, tiny_sd1_model):
    data = tiny_sd1_model.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="is truncated: it should be .* Download it again"):
        inspect_model(cut)


def test_garbage_file(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(struct.pack("<Q", 20) + b"{not json at all!!!}" + b"\0" * 10)
    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        inspect_model(bad)
    huge = tmp_path / "huge.safetensors"
    huge.write_bytes(struct.pack("<Q", 10**12) + b"{}")
    with pytest.raises(CheckpointError, match="truncated or not a safetensors file"):
        inspect_model(huge)


def test_pickle_refused_without_opt_in(tmp_path):
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.x": torch.zeros(1)}}, path)
    with pytest.raises(UnsafeCheckpoint, match="--allow-pickle"):
        inspect_model(path)
    source = inspect_model(path, allow_pickle=True)
    assert source.keys == {"model.diffusion_model.x": (1,)}


def test_pickle_with_code_is_refused_even_with_opt_in(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": Evil()}, path)
    with pytest.raises(CheckpointError, match="could not be loaded safely"):
        inspect_model(path, allow_pickle=True)


@pytest.mark.parametrize("keys,kind", [
    ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 8)}, "LoRA"),
    ({"encoder.conv_in.weight": (8, 3, 3, 3), "decoder.conv_out.weight": (3, 8, 3, 3)}, "VAE"),
    ({"emb_params": (2, 768)}, "textual inversion embedding"),
])
def test_non_model_files_are_named(tmp_path, keys, kind):
    path = tmp_path / "thing.safetensors"
    save_file({k: torch.zeros(s) for k, s in keys.items()}, path)
    with pytest.raises(WrongModelType, match=f"is a {kind}, not a Stable Diffusion model"):
        ensure_model_file(inspect_model(path))
