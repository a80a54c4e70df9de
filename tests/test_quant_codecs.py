"""Block formats: our numpy codecs and Numba quantizers are byte-identical to gguf-py's reference."""
import numpy as np
import pytest

import gguf
from gguf import GGMLQuantizationType as G

from infer.quant import codecs, types
from infer.quant.quantize import quantize_rows
from infer.quant.recipes import RECIPES, get_recipe, plan_type, use_more_bits

PAIRS = [(types.Q8_0, G.Q8_0), (types.Q4_0, G.Q4_0), (types.Q4_1, G.Q4_1), (types.BF16, G.BF16),
         (types.F16, G.F16), (types.F32, G.F32)]


def tricky(rows=37, cols=256, seed=0):
    """Random rows of very different scales plus all-zero, tiny, huge, constant and tie blocks."""
    x = _tricky(max(rows, 8), max(cols, 128), seed)
    if x.shape != (rows, cols):                           # small shapes: a slice that still has specials
        x = np.ascontiguousarray(x.reshape(-1)[32:32 + rows * cols].reshape(rows, cols))
    return x


def _tricky(rows, cols, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, cols)).astype(np.float32)
    x *= (10.0 ** rng.uniform(-9, 3, (rows, 1))).astype(np.float32)
    x[0] = 0.0                                            # all-zero blocks
    x[1, :64] = 1e-30                                     # below float16 range: scale flushes to 0
    x[1, 64:96] = np.float32(3e-8) * rng.standard_normal(32)  # subnormal float16 scales
    x[2, :32] = -3.0                                      # constant block
    x[2, 32:64] = 70000.0                                 # scale overflows float16 (inf), as in C
    x[3, :32] = np.tile([0.5, -0.5], 16)                  # ties for the largest magnitude
    x[3, 32:64] = np.linspace(-1, 1, 32)                  # exact .5 roundings
    x[4, :32] = np.arange(32) - 16                        # integers
    return x


def reference(x, g):
    return np.asarray(gguf.quants.quantize(x, g)).view(np.uint8).reshape(x.shape[0], -1)


@pytest.mark.parametrize("qt,g", PAIRS, ids=[p[0].name for p in PAIRS])
@pytest.mark.parametrize("shape", [(37, 256), (1, 32), (5, 96), (64, 576)])
def test_bytes_identical_to_gguf(qt, g, shape):
    x = tricky(*shape, seed=shape[0])
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        want = reference(x, g)
    assert np.array_equal(codecs.quantize(x, qt), want)
    assert np.array_equal(quantize_rows(x, qt), want)


@pytest.mark.parametrize("qt,g", PAIRS[:4], ids=[p[0].name for p in PAIRS[:4]])
def test_dequantize_matches_gguf(qt, g):
    x = tricky(9, 128, seed=3)
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        raw = codecs.quantize(x, qt)
        want = gguf.quants.dequantize(raw, g).reshape(x.shape)
    assert np.array_equal(codecs.dequantize(raw, qt), want, equal_nan=True)


def test_odd_row_counts_and_many_seeds():
    for seed in range(20):
        rng = np.random.default_rng(100 + seed)
        rows = int(rng.integers(1, 40))
        x = (rng.standard_normal((rows, 32 * int(rng.integers(1, 9)))) * rng.uniform(1e-4, 50)).astype(np.float32)
        for qt, g in PAIRS[:4]:
            assert np.array_equal(quantize_rows(x, qt), reference(x, g)), (seed, qt.name)


def test_bf16_nan_inf_and_rounding():
    bits = np.array([0x7F800000, 0xFF800000, 0x7FC00000, 0x7F800001, 0xFFFFFFFF, 0x3F808000, 0x3F818000,
                     0x3F80FFFF, 0x7F7FFFFF, 0x00000001, 0x80000000, 0x00000000], dtype=np.uint32)
    x = bits.view(np.float32).reshape(1, -1)
    want = reference(x, G.BF16)
    assert np.array_equal(codecs.quantize(x, types.BF16), want)
    assert np.array_equal(quantize_rows(x, types.BF16), want)


def test_quantization_error_is_small():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((16, 256)).astype(np.float32)
    for qt, tol in ((types.Q8_0, 0.01), (types.Q4_0, 0.2), (types.Q4_1, 0.15)):
        err = np.abs(codecs.dequantize(quantize_rows(x, qt), qt) - x).max()
        assert err < tol * np.abs(x).max(), qt.name


def test_block_layout_constants():
    for qt in (types.Q8_0, types.Q4_0, types.Q4_1):
        bs, ts = gguf.GGML_QUANT_SIZES[G[qt.name]]
        assert (qt.block_size, qt.type_size) == (bs, ts)
        assert qt.id == int(G[qt.name])


def test_rejects_rows_not_multiple_of_block():
    with pytest.raises(ValueError):
        quantize_rows(np.zeros((2, 48), np.float32), types.Q8_0)


# --------------------------------------------------------------------------------------------- recipes
def test_recipe_rules():
    assert plan_type("q4_0", "blk.0.attn_norm.weight", (64,)) is types.F32
    assert plan_type("q4_0", "blk.0.attn_q.bias", (64,)) is types.F32
    assert plan_type("q8_0", "output_norm.weight", (64,)) is types.F32
    assert plan_type("q4_0", "blk.0.attn_q.weight", (64, 64)) is types.Q4_0
    assert plan_type("q4_0", "token_embd.weight", (100, 64)) is types.Q4_0
    assert plan_type("q8_0", "blk.0.ffn_up.weight", (96, 48)) is types.F16      # 48 % 32: llama.cpp falls back
    assert plan_type("bf16", "blk.0.ffn_up.weight", (96, 48)) is types.BF16
    assert plan_type("f32", "token_embd.weight", (100, 64)) is types.F32
    m = get_recipe("q4_1_mixed")
    assert plan_type(m, "token_embd.weight", (100, 64), 24) is types.Q8_0
    assert plan_type(m, "output.weight", (100, 64), 24) is types.Q8_0
    assert plan_type(m, "blk.3.attn_v.weight", (32, 64), 24) is types.Q8_0
    assert plan_type(m, "blk.3.attn_q.weight", (64, 64), 24) is types.Q4_1
    downs = [i for i in range(24) if plan_type(m, f"blk.{i}.ffn_down.weight", (64, 96), 24) is types.Q8_0]
    assert downs == [i for i in range(24) if use_more_bits(i, 24)] and 0 < len(downs) < 24
    assert {r.file_type for r in RECIPES.values()} == {0, 1, 2, 3, 7, 32}
    with pytest.raises(KeyError):
        get_recipe("q3_k")
