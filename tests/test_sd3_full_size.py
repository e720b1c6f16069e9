"""benchmarks/sd3_full_size.py at its tiny size (the full-size runs are by hand: docs/bridge-memory.md).

The same code paths as the full-size measurement: the folder is built component by component with
the real tokenizer vocabularies, loaded through SD3Bridge.from_pretrained, and every mode runs the
three calls; here in this process (the full-size script gives each mode a fresh one)."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import sd3_full_size as full
from minidiff.tools.cli import run

SIZE = 32  # pixels: 4 x 4 latents, 2 x 2 patches


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return full.build(tmp_path_factory.mktemp("sd35") / "sd3.5-tiny", "tiny")


def measure(folder, mode, tmp_path, steps=2) -> dict:
    out = tmp_path / f"{mode}.json"
    full.worker(str(folder), mode, SIZE, steps, 1, str(out), None)
    return json.loads(out.read_text())


def test_the_folder_has_the_real_vocabularies_and_loads_through_the_bridge(folder):
    from transformers import AutoTokenizer

    assert len(AutoTokenizer.from_pretrained(folder / "tokenizer")) == 49408
    assert AutoTokenizer.from_pretrained(folder / "tokenizer_2").pad_token == "!"
    assert len(AutoTokenizer.from_pretrained(folder / "tokenizer_3")) == 32100  # the embedding has 32128 rows
    configs = {name: json.loads((folder / name / "config.json").read_text())
               for name in ("text_encoder", "text_encoder_2", "text_encoder_3", "vae", "transformer")}
    assert configs["text_encoder"]["vocab_size"] == configs["text_encoder_2"]["vocab_size"] == 49408
    assert configs["text_encoder_3"]["vocab_size"] == 32128
    assert (configs["vae"]["latent_channels"], configs["vae"]["scaling_factor"], configs["vae"]["shift_factor"]) == \
        (16, 1.5305, 0.0609)
    assert configs["transformer"]["qk_norm"] == "rms_norm" and configs["transformer"]["dual_attention_layers"] == [0, 1]
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "FlowMatchEulerDiscreteScheduler" and scheduler["shift"] == 3.0


def test_counts_match_the_published_sizes():
    """Medium's 2.5 B is the transformer's parameters plus its saved position table (a buffer);
    Large's 8.1 B is its parameters alone (with the smaller table: 8.15 B)."""
    medium, large = full.parameter_counts("medium"), full.parameter_counts("large")
    m, l = medium["transformer"], large["transformer"]
    assert abs(m["parameters"] + m["buffers"] - 2.5e9) < 0.05e9 and m["parameters"] < 2.3e9
    assert abs(l["parameters"] - 8.1e9) < 0.05e9
    assert m["buffers"] == 384 * 384 * 1536 and l["buffers"] == 192 * 192 * 2432  # the sin-cos tables
    assert m["dual_attention_parameters"] > 0 and l["dual_attention_parameters"] == 0
    assert medium["text_encoder_3"]["parameters"] == large["text_encoder_3"]["parameters"] > 4.7e9  # T5-XXL encoder


def test_each_mode_runs_the_three_calls_and_inpainting_keeps_the_unmasked_half(folder, tmp_path):
    records = {mode: measure(folder, mode, tmp_path) for mode in ("default", "drop_t5")}  # bf16: further down
    assert records["default"]["t5"] and not records["drop_t5"]["t5"]
    for record in records.values():
        calls = record["calls"]
        assert calls["sample"]["steps_run"] == 2 and calls["inpaint"]["steps_run"] == 2
        assert calls["img2img"]["steps_run"] == 3  # 4 steps at strength 0.6: diffusers runs 4 - int(4 - 2.4)
        assert calls["inpaint"]["kept_exact"] is True
        assert record["peak"]["VmHWM"] >= record["after_load"]["VmRSS"] > 0
        assert record["load_s"] > 0 and all(c["s_per_step"] > 0 for c in calls.values())
    assert "weights_bytes" in records["drop_t5"] and "text_encoder_3" not in records["drop_t5"]["weights_bytes"]


def test_int8_quantises_every_linear_layer_of_the_transformer(folder, tmp_path):
    record = measure(folder, "int8", tmp_path, steps=1)
    transformer = record["int8"]["transformer"]
    assert transformer["quantised_linear"] == transformer["linear"] > 0
    assert "Linear" not in transformer["full_precision_parameters_by_layer_type"]
    t5 = record["int8"]["text_encoder_3"]
    assert 0 < t5["quantised_linear"] <= t5["linear"]
    assert record["calls"]["inpaint"]["kept_exact"] is True


def test_bf16_check_compares_one_forward(folder):
    result = full.bf16_check(folder / "transformer", SIZE // 8, threads=1)
    assert result["finite"] and 0 < result["relative_error"] < 0.03 and result["cosine"] > 0.999


@pytest.mark.parametrize("argv,message", [
    (["cpu", "--folder", "x", "--modes", "fp8"], "unknown mode 'fp8'"),
    (["cpu", "--folder", "x", "--size", "250"], "250 is not a positive multiple of 16"),
    (["all", "--out", "x", "--modes", "int8+nf4"], "unknown mode 'nf4'"),
])
def test_bad_input_is_one_error_line(argv, message, capsys):
    assert run(full.main, argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ") and message in err


def test_the_gpu_table_refuses_without_cuda(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert run(full.main, ["gpu", "--out", str(tmp_path)]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


# --- the CPU dtype rule: bf16 where the CPU has it natively ----------------------------------------

@pytest.mark.parametrize("flags,native", [("fpu avx2 avx512f avx512_bf16 avx512_vnni", True),
                                          ("fpu avx2 amx_bf16 amx_tile", True),
                                          ("fpu avx2 avx512f avx512bw avx512_vnni", False),  # AVX512 without BF16
                                          ("fp asimd bf16 i8mm", True)])  # Arm: "Features" line
def test_native_bf16_is_read_from_the_cpu_flags(tmp_path, flags, native):
    from bridge.sd3 import cpu_has_native_bf16

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    assert cpu_has_native_bf16(str(cpuinfo)) is native
    assert cpu_has_native_bf16(str(tmp_path / "missing")) is False


@pytest.mark.parametrize("native,expected", [(True, torch.bfloat16), (False, torch.float32)])
def test_the_cpu_default_is_bf16_only_where_native(monkeypatch, native, expected):
    from bridge import sd3

    monkeypatch.setattr(sd3, "cpu_has_native_bf16", lambda: native)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert sd3.default_dtype(torch.device("cpu")) == expected
    assert sd3.default_dtype(torch.device("cuda")) == torch.bfloat16  # CUDA keeps its own rule
    assert sd3.default_dtype(torch.device("mps")) == torch.float32


def test_the_default_mode_on_a_native_bf16_cpu_loads_bf16_without_a_warning(folder, tmp_path, monkeypatch, recwarn):
    from bridge import sd3

    monkeypatch.setattr(sd3, "cpu_has_native_bf16", lambda: True)
    record = measure(folder, "default", tmp_path, steps=1)
    assert record["dtype"] == "bfloat16" and record["calls"]["inpaint"]["kept_exact"] is True
    assert not [w for w in recwarn if "bf16" in str(w.message) or "bfloat16" in str(w.message)]
    monkeypatch.setattr(sd3, "cpu_has_native_bf16", lambda: False)
    with pytest.warns(UserWarning, match="emulated"):
        sd3.SD3Bridge.from_pretrained(folder, device="cpu", dtype=torch.bfloat16)
