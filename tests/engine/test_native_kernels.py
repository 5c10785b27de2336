"""The C kernels against the torch operations they replace, and how the engine chooses them."""

import pytest
import torch
import torch.nn.functional as F

from pipeline.engine import native_kernels
from pipeline.engine.attention import gather_blocks
from pipeline.engine.fast_forward import _rotate
from pipeline.engine.native_kernels import NativeKernelError, choose_native_kernels
from pipeline.settings import Settings, SettingsError

needs_native = pytest.mark.skipif(native_kernels.unavailable_reason() is not None,
                                  reason=str(native_kernels.unavailable_reason()))
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def kernels():
    if native_kernels.unavailable_reason() is not None:
        pytest.skip(native_kernels.unavailable_reason())
    return native_kernels.load()


def paged_cache(num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int, context_lens: list[int],
                generator: torch.Generator):
    """A random cache and, per seq, a block table of distinct shuffled blocks padded with block 0."""
    cache = torch.randn(num_blocks, block_size, 2, num_kv_heads, head_dim, generator=generator)
    max_blocks = -(-max(context_lens) // block_size)
    shuffled = torch.randperm(num_blocks, generator=generator).tolist()
    tables = []
    for length in context_lens:
        used = -(-length // block_size)
        tables.append([shuffled.pop() for _ in range(used)] + [0] * (max_blocks - used))
    return cache, torch.tensor(tables, dtype=torch.long)


def reference_attention(query, cache, block_tables, context_lens, scale):
    """Gather each seq's blocks and run SDPA with every query head repeated onto its KV head."""
    outputs = []
    for seq, length in enumerate(context_lens):
        kv = gather_blocks(cache, block_tables[seq])[:length]  # [length, 2, kv_heads, head_dim]
        keys, values = kv[:, 0].transpose(0, 1), kv[:, 1].transpose(0, 1)
        q = query[seq].unsqueeze(1)  # [q_heads, 1, head_dim]
        outputs.append(F.scaled_dot_product_attention(q, keys, values, scale=scale, enable_gqa=True)[:, 0])
    return torch.stack(outputs)


# With few seqs the kernel splits work per (seq, KV head), with many per seq; 40 seqs take the second way
# on up to 20 threads.
@pytest.mark.parametrize("num_seqs", [5, 40])
@pytest.mark.parametrize("num_q_heads,num_kv_heads,head_dim", [(9, 3, 64), (14, 2, 64), (4, 4, 128), (16, 1, 32)])
def test_paged_decode_attention_matches_sdpa(kernels, num_q_heads, num_kv_heads, head_dim, num_seqs):
    generator = torch.Generator().manual_seed(num_q_heads * head_dim)
    context_lens = ([1, 16, 17, 45, 130] * 8)[:num_seqs]
    cache, block_tables = paged_cache(512, 16, num_kv_heads, head_dim, context_lens, generator)
    # The query is a view into a wider fused row, as the fast path passes it.
    fused = torch.randn(len(context_lens), (num_q_heads + 2 * num_kv_heads) * head_dim, generator=generator)
    query = fused[:, :num_q_heads * head_dim].view(len(context_lens), num_q_heads, head_dim)
    lens = torch.tensor(context_lens, dtype=torch.long)
    out = torch.empty(len(context_lens), num_q_heads, head_dim)

    kernels.paged_decode_attention(query, cache, block_tables, lens, head_dim ** -0.5, out)

    expected = reference_attention(query, cache, block_tables, context_lens, head_dim ** -0.5)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_paged_decode_attention_accepts_heads_major_query(kernels):
    generator = torch.Generator().manual_seed(3)
    cache, block_tables = paged_cache(8, 4, 2, 16, [5, 9], generator)
    heads_major = torch.randn(4, 2, 16, generator=generator).transpose(0, 1)  # [seqs, heads, dim], not row-major
    lens = torch.tensor([5, 9], dtype=torch.long)
    out = torch.empty(2, 4, 16)

    kernels.paged_decode_attention(heads_major, cache, block_tables, lens, 0.25, out)

    torch.testing.assert_close(out, reference_attention(heads_major, cache, block_tables, [5, 9], 0.25))


@pytest.mark.parametrize("rows", [1, 16, 300])
def test_rms_norm_and_residual_add_match_torch(kernels, rows):
    generator = torch.Generator().manual_seed(rows)
    hidden, delta = torch.randn(rows, 576, generator=generator), torch.randn(rows, 576, generator=generator)
    weight = torch.rand(576, generator=generator) + 0.5

    torch.testing.assert_close(kernels.rms_norm(hidden, weight, 1e-5), F.rms_norm(hidden, (576,), weight, 1e-5))

    residual = hidden.clone()
    normed = kernels.add_rms_norm(residual, delta, weight, 1e-5)
    assert torch.equal(residual, hidden + delta)  # the residual add is exact
    torch.testing.assert_close(normed, F.rms_norm(hidden + delta, (576,), weight, 1e-5))


@pytest.mark.parametrize("rows", [1, 16, 300])
def test_silu_and_mul_matches_torch(kernels, rows):
    gate_up = torch.randn(rows, 2 * 1536, generator=torch.Generator().manual_seed(rows)) * 4
    gate, up = gate_up.chunk(2, dim=-1)

    torch.testing.assert_close(kernels.silu_and_mul(gate_up), F.silu(gate) * up, rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("tokens", [1, 100])
def test_rotary_write_kv_matches_torch(kernels, tokens):
    num_q, num_kv, head_dim, block_size = 9, 3, 64, 16
    generator = torch.Generator().manual_seed(tokens)
    qkv = torch.randn(tokens, (num_q + 2 * num_kv) * head_dim, generator=generator)
    angles = torch.rand(tokens, head_dim // 2, generator=generator) * 6
    cos, sin = torch.cat((angles.cos(), angles.cos()), -1), torch.cat((angles.sin(), angles.sin()), -1)
    cache = torch.zeros(20, block_size, 2, num_kv, head_dim)
    slots = torch.randperm(20 * block_size, generator=generator)[:tokens]

    qk = kernels.rotary_write_kv(qkv, cos, sin, cache, slots, num_q, num_kv)

    expected = _rotate(qkv[:, :(num_q + num_kv) * head_dim].view(tokens, num_q + num_kv, head_dim),
                       cos[:, None, :], sin[:, None, :])
    assert torch.equal(qk, expected)  # both products rounded, as torch does
    flat = cache.view(-1, 2, num_kv, head_dim)
    assert torch.equal(flat[slots, 0], expected[:, num_q:])
    assert torch.equal(flat[slots, 1], qkv[:, (num_q + num_kv) * head_dim:].view(tokens, num_kv, head_dim))
    untouched = torch.ones(flat.shape[0], dtype=torch.bool)
    untouched[slots] = False
    assert not flat[untouched].any()


@needs_native
def test_choice_follows_the_setting_and_the_model():
    assert choose_native_kernels("auto", CPU, torch.float32, 9, 3, 64) is native_kernels.load()
    assert choose_native_kernels("off", CPU, torch.float32, 9, 3, 64) is None
    # head_dim 12 is not a multiple of 8: auto falls back to torch, on names the reason.
    assert choose_native_kernels("auto", CPU, torch.float32, 4, 2, 12) is None
    with pytest.raises(NativeKernelError, match="head_dim 12"):
        choose_native_kernels("on", CPU, torch.float32, 4, 2, 12)
    with pytest.raises(NativeKernelError, match="torch.bfloat16"):
        choose_native_kernels("on", CPU, torch.bfloat16, 9, 3, 64)
    with pytest.raises(ValueError, match="native_kernels='fast'"):
        choose_native_kernels("fast", CPU, torch.float32, 9, 3, 64)


def test_failed_build_names_the_compiler_error(tmp_path, monkeypatch):
    if native_kernels.unavailable_reason() is not None:
        pytest.skip(native_kernels.unavailable_reason())
    monkeypatch.setenv("CHATPIPE_HOME", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # a compiler that always fails
    monkeypatch.setattr("pipeline.settings._settings", None)
    native_kernels.load.cache_clear()
    try:
        with pytest.raises(NativeKernelError, match="compiling the native kernels failed with exit code 1"):
            native_kernels.load()
        assert choose_native_kernels("auto", CPU, torch.float32, 9, 3, 64) is None
        assert not list((tmp_path / "kernels").glob("*.so"))
    finally:
        native_kernels.load.cache_clear()


def test_setting_rejects_unknown_value(monkeypatch):
    monkeypatch.setenv("CHATPIPE_NATIVE_KERNELS", "yes")
    with pytest.raises(SettingsError, match="CHATPIPE_NATIVE_KERNELS='yes' is invalid; use auto, on or off"):
        Settings()


def test_engine_config_rejects_unknown_value():
    from pipeline.engine import EngineConfig

    with pytest.raises(ValueError, match="EngineConfig.native_kernels='yes' is invalid"):
        EngineConfig(native_kernels="yes")
