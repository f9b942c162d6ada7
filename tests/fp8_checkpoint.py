"""Write FP8 block-quantized checkpoints (DeepSeek's format) from tiny random ones, for tests.

Each projection weight becomes float8_e4m3fn values plus a float32 ``weight_scale_inv`` per block, scaled
so the block's largest magnitude maps to e4m3's largest finite value (448), as DeepSeek's quantizer does.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from xllm_compiler.models.fp8 import dequantize, scale_name

E4M3_MAX = torch.finfo(torch.float8_e4m3fn).max
#: Name fragments of 2-D weights DeepSeek leaves unquantized: embeddings, the head, norms, routers.
DEFAULT_SKIP = ("embed_tokens", "lm_head", "norm", "mlp.gate.", "shared_expert_gate")


def quantize_blocks(weight: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 values [N, K], float32 scale_inv [ceil(N/bn), ceil(K/bk)]) of a 2-D weight."""
    n, k = weight.shape
    bn, bk = block
    rows, cols = math.ceil(n / bn), math.ceil(k / bk)
    padded = torch.zeros(rows * bn, cols * bk, dtype=torch.float32)
    padded[:n, :k] = weight.float()
    blocks = padded.view(rows, bn, cols, bk)
    amax = blocks.abs().amax(dim=(1, 3))
    scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    values = (blocks / scale[:, None, :, None]).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return values.view(rows * bn, cols * bk)[:n, :k].contiguous(), scale


def quantizable(name: str, tensor: torch.Tensor, skip: tuple[str, ...] = DEFAULT_SKIP) -> bool:
    return tensor.dim() == 2 and name.endswith(".weight") and not any(part in name for part in skip)


def quantize_checkpoint_to_fp8(
    src_dir: Path,
    dst_dir: Path,
    block: tuple[int, int] = (128, 128),
    skip: tuple[str, ...] = DEFAULT_SKIP,
) -> dict[str, torch.Tensor]:
    """Copy the checkpoint in ``src_dir`` to ``dst_dir`` (one safetensors file) with its projection weights
    in fp8 blocks and config.json declaring them; returns the state dict as the fp8 checkpoint means it:
    quantized weights dequantized (in float32, cast back to their dtype), the others unchanged."""
    stored, meant = {}, {}
    for name, tensor in checkpoint_tensors(src_dir).items():
        if not quantizable(name, tensor, skip):
            stored[name] = meant[name] = tensor
            continue
        values, scale = quantize_blocks(tensor, block)
        stored[name], stored[scale_name(name)] = values, scale
        meant[name] = dequantize(values, scale, block).to(tensor.dtype)
    quant = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": list(block)}
    save_quantized(src_dir, dst_dir, stored, quant)
    return meant


def checkpoint_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint in ``model_dir`` (one safetensors file or several)."""
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(Path(model_dir).glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def save_quantized(src_dir: Path, dst_dir: Path, stored: dict[str, torch.Tensor], quant: dict) -> None:
    """``stored`` as the checkpoint in ``dst_dir``, with ``src_dir``'s other files and its config.json
    declaring ``quant`` as its quantization_config."""
    src_dir, dst_dir = Path(src_dir), Path(dst_dir)
    dst_dir.mkdir(parents=True, exist_ok=True)
    save_file(stored, str(dst_dir / "model.safetensors"), metadata={"format": "pt"})
    copy_side_files(src_dir, dst_dir)
    config = json.loads((src_dir / "config.json").read_text())
    config["quantization_config"] = quant
    (dst_dir / "config.json").write_text(json.dumps(config, indent=2))


def copy_side_files(src_dir: Path, dst_dir: Path) -> None:
    """Everything of a checkpoint folder but its weights (config, generation config, tokenizer)."""
    for file in src_dir.iterdir():
        if file.is_file() and not file.name.startswith("model.safetensors"):
            shutil.copyfile(file, dst_dir / file.name)


def save_dequantized(src_dir: Path, dst_dir: Path, state: dict[str, torch.Tensor]) -> Path:
    """A plain checkpoint in ``dst_dir`` holding ``state`` with ``src_dir``'s config and other files."""
    src_dir, dst_dir = Path(src_dir), Path(dst_dir)
    dst_dir.mkdir(parents=True, exist_ok=True)
    copy_side_files(src_dir, dst_dir)
    save_file(
        {k: v.contiguous() for k, v in state.items()}, str(dst_dir / "model.safetensors"), metadata={"format": "pt"}
    )
    return dst_dir
