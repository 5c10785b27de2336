"""fp16-packed linear layers and the choice of weight format."""

import json

import pytest
import torch
import torch.nn.functional as F

from pipeline.models.loader import choose_weight_format
from pipeline.models.packed_linear import (
    PackedFp16Linear,
    PackedSlice,
    WeightFormatError,
    fp16_packing_available,
    fuse_packed,
    pack_linear_layers,
)
from pipeline.settings import Settings, SettingsError

needs_fbgemm = pytest.mark.skipif(not fp16_packing_available(), reason="this torch build has no FBGEMM fp16 kernels")


def rounded_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The float32 product with the weight rounded to fp16: what the packed kernel should compute."""
    return F.linear(x, weight.half().float(), bias)


@needs_fbgemm
@pytest.mark.parametrize("num_rows", [1, 7, 64])
def test_packed_linear_equals_float32_product_of_fp16_weights(num_rows):
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 40)
    x = torch.randn(num_rows, 96)
    packed = PackedFp16Linear.from_linear(linear)

    expected = rounded_linear(x, linear.weight.detach(), linear.bias.detach())
    torch.testing.assert_close(packed(x), expected, rtol=1e-5, atol=1e-5)
    # the float32 weight itself gives a measurably different result, so the check above is not vacuous
    assert not torch.allclose(F.linear(x, linear.weight, linear.bias), expected, rtol=0, atol=1e-7)


@needs_fbgemm
def test_packed_linear_keeps_leading_dimensions():
    linear = torch.nn.Linear(32, 8, bias=False)
    packed = PackedFp16Linear.from_linear(linear)
    x = torch.randn(2, 3, 32)
    assert packed(x).shape == (2, 3, 8)
    torch.testing.assert_close(packed(x), rounded_linear(x, linear.weight.detach()), rtol=1e-5, atol=1e-5)


@needs_fbgemm
def test_unpacked_weight_is_the_fp16_rounded_weight():
    weight = torch.randn(16, 24)
    unpacked, bias = PackedFp16Linear(weight).unpacked()
    assert bias is None
    assert torch.equal(unpacked, weight.half().float())


@needs_fbgemm
def test_fused_product_matches_separate_bitwise():
    torch.manual_seed(1)
    parts = [PackedFp16Linear(torch.randn(rows, 64), torch.randn(rows)) for rows in (48, 16, 16)]
    fused, slices = fuse_packed(parts)
    x = torch.randn(5, 64)

    assert fused.out_features == 80
    assert torch.equal(fused(x), torch.cat([part(x) for part in parts], dim=-1))
    for part, piece in zip(parts, slices):
        assert isinstance(piece, PackedSlice)
        assert torch.equal(piece(x), part(x))


@needs_fbgemm
def test_packing_rejects_a_bfloat16_weight():
    with pytest.raises(WeightFormatError, match="CHATPIPE_WEIGHT_FORMAT=dense"):
        PackedFp16Linear(torch.randn(4, 4, dtype=torch.bfloat16))


@needs_fbgemm
def test_pack_layers_keeps_embedding():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 8), torch.nn.Linear(8, 8), torch.nn.ReLU(),
                                torch.nn.Linear(8, 10))
    x = torch.tensor([1, 2, 3])
    expected = rounded_linear(torch.relu(rounded_linear(model[0](x), model[1].weight.detach(), model[1].bias.detach())),
                              model[3].weight.detach(), model[3].bias.detach())

    assert pack_linear_layers(model) == 2

    assert not any(isinstance(module, torch.nn.Linear) for module in model.modules())
    assert isinstance(model[0], torch.nn.Embedding)
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


def test_weight_format_names_the_allowed_values():
    with pytest.raises(WeightFormatError, match="auto, dense, fp16-packed"):
        choose_weight_format(torch.device("cpu"), torch.float32, "int4")


def test_fp16_packed_needs_float32_on_cpu():
    with pytest.raises(WeightFormatError, match="bfloat16 on cpu"):
        choose_weight_format(torch.device("cpu"), torch.bfloat16, "fp16-packed")
    with pytest.raises(WeightFormatError, match="on cuda"):
        choose_weight_format(torch.device("cuda"), torch.float32, "fp16-packed")


def test_auto_keeps_dense_weights_where_packing_cannot_run():
    assert choose_weight_format(torch.device("cuda"), torch.bfloat16, "auto") == "dense"
    assert choose_weight_format(torch.device("cpu"), torch.bfloat16, "auto") == "dense"
    assert choose_weight_format(torch.device("cpu"), torch.float32, "dense") == "dense"


def test_settings_reject_an_unknown_weight_format(monkeypatch):
    monkeypatch.setenv("CHATPIPE_WEIGHT_FORMAT", "fp8")
    with pytest.raises(SettingsError, match="CHATPIPE_WEIGHT_FORMAT='fp8' is invalid; use auto, dense or fp16-packed"):
        Settings()


def test_probe_verdict_kept_only_when_cpu_idle(tmp_path, monkeypatch):
    from pipeline.models import loader

    monkeypatch.setenv("CHATPIPE_HOME", str(tmp_path))
    monkeypatch.setattr("pipeline.settings._settings", None)
    runs = []

    def probe() -> bool:
        runs.append(1)
        return True

    # A load average above the core count stands for other processes skewing the timings.
    monkeypatch.setattr(loader.os, "getloadavg", lambda: (99.0, 99.0, 99.0))
    assert loader._cached_verdict("test_probe", probe) is True
    assert not (tmp_path / "cpu_probes.json").exists()

    monkeypatch.setattr(loader.os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    assert loader._cached_verdict("test_probe", probe) is True
    assert json.loads((tmp_path / "cpu_probes.json").read_text())["test_probe"]["verdict"] is True
    assert loader._cached_verdict("test_probe", probe) is True
    assert len(runs) == 2  # the kept verdict was read, not measured a third time


def test_probe_verdict_kept_under_load_on_request(tmp_path, monkeypatch):
    from pipeline.models import loader

    monkeypatch.setenv("CHATPIPE_HOME", str(tmp_path))
    monkeypatch.setattr("pipeline.settings._settings", None)
    monkeypatch.setattr(loader.os, "getloadavg", lambda: (99.0, 99.0, 99.0))

    assert loader._cached_verdict("test_probe", lambda: False, keep_under_load=True) is False
    assert json.loads((tmp_path / "cpu_probes.json").read_text())["test_probe"]["verdict"] is False
