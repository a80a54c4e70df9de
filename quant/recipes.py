"""Recipes: which type each tensor of a converted model gets.

    plan_type(recipe, gguf_name, shape, n_layers) -> QType          shape in numpy order (rows, cols)

Rules shared by every recipe (the same as llama.cpp's convert_hf_to_gguf.py):
  * 1-D tensors (norms, biases, rope factors) and every `*_norm.weight` stay F32;
  * a tensor whose row length is not a multiple of the block size of a block type falls back to F16
    (what both llama.cpp's converter and llama-quantize do for the 32-element block types).

Recipes (`--type`):
  f32, f16, bf16, q8_0, q4_0, q4_1   every other tensor in that type ("pure": q4_0 also quantizes
                                     token_embd/output to q4_0, where llama-quantize would pick Q6_K)
  q4_0_mixed, q4_1_mixed             INT4 with the tensors that hurt most kept at Q8_0:
                                       token_embd.weight, output.weight      -> q8_0
                                       blk.N.attn_v.weight (every layer)     -> q8_0 (small with GQA)
                                       blk.N.attn_qkv.weight (fused, phi3)   -> q8_0 (it holds attn_v;
                                         llama.cpp's mixes raise it above the base type too)
                                       blk.N.ffn_down.weight on the layers llama.cpp's Q4_K_M gives
                                       more bits (first and last eighth, every third between) -> q8_0
                                       everything else                       -> q4_0 / q4_1
`general.file_type` of a recipe is the LlamaFileType of its main type (q4_*_mixed: MOSTLY_Q4_0/Q4_1).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from .types import BF16, F16, F32, Q4_0, Q4_1, Q8_0, QType

# llama.cpp's LlamaFileType values for general.file_type
FILE_TYPE = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "BF16": 32}


@dataclass(frozen=True)
class Recipe:
    name: str
    base: QType
    mixed: bool = False
    description: str = ""

    @property
    def file_type(self) -> int:
        return FILE_TYPE[self.base.name]


RECIPES: dict[str, Recipe] = {r.name: r for r in (
    Recipe("f32", F32, description="float32, lossless"),
    Recipe("f16", F16, description="float16"),
    Recipe("bf16", BF16, description="bfloat16, lossless from bf16 checkpoints"),
    Recipe("q8_0", Q8_0, description="8-bit blocks of 32 (8.5 bits per weight)"),
    Recipe("q4_0", Q4_0, description="4-bit blocks of 32 with a scale (4.5 bpw), every matrix"),
    Recipe("q4_1", Q4_1, description="4-bit blocks of 32 with scale and minimum (5 bpw), every matrix"),
    Recipe("q4_0_mixed", Q4_0, True, "q4_0, with embeddings, output, attn_v and some ffn_down at q8_0"),
    Recipe("q4_1_mixed", Q4_1, True, "q4_1, with embeddings, output, attn_v and some ffn_down at q8_0"),
)}

_LAYER = re.compile(r"^blk\.(\d+)\.")


def get_recipe(name: str) -> Recipe:
    r = RECIPES.get(name.lower())
    if r is None:
        raise KeyError(f"unknown type {name!r}; choose one of {', '.join(RECIPES)}")
    return r


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp's choice of the layers that get more bits in its *_M mixes."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def _fits(qt: QType, shape) -> bool:
    return shape[-1] % qt.block_size == 0


def plan_type(recipe: Recipe | str, name: str, shape, n_layers: int = 0) -> QType:
    """The type tensor `name` of numpy shape `shape` gets under `recipe`."""
    if isinstance(recipe, str):
        recipe = get_recipe(recipe)
    if len(shape) <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight"):
        return F32
    qt = recipe.base
    if recipe.mixed:
        if name in ("token_embd.weight", "output.weight") or name.endswith((".attn_v.weight", ".attn_qkv.weight")):
            qt = Q8_0
        elif name.endswith(".ffn_down.weight"):
            m = _LAYER.match(name)
            if m and n_layers and use_more_bits(int(m.group(1)), n_layers):
                qt = Q8_0
    if not _fits(qt, shape):
        return F16
    return qt
