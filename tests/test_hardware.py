"""`llm2diff.hardware`: CPU features read from /proc/cpuinfo text, the bfloat16-is-slow decision for CPUs with
AMX (fast), with AVX-512 bfloat16 but no AMX (measured: both outcomes) and with AVX2 only (slow), the one-line
description, and the warning that `llm2diff generate` / `chat` print when they sample in bfloat16 where it is the
slow dtype. The CPU and its measurement are always faked: nothing here depends on the machine the tests run on."""

from __future__ import annotations

import io
import logging

import pytest
import torch
from conftest import adapted_with_saved_base

from llm2diff import hardware
from llm2diff.cli import main
from llm2diff.hardware import CpuInfo, bf16_is_fast, describe, parse_cpuinfo, slow_dtype_message, warn_if_slow_dtype
from llm2diff.hardware import measure_bf16_over_fp32 as real_measure

COMMON = "fpu vme de pse tsc msr pae mce cx8 apic sep mtrr sse sse2 ssse3 fma sse4_1 sse4_2 avx f16c bmi1 bmi2"


def cpuinfo_text(model: str, flags: str, processors: int = 2) -> str:
    """/proc/cpuinfo as Linux writes it on x86: one entry per logical processor."""
    entry = ("processor\t: {i}\nvendor_id\t: Fake\ncpu family\t: 6\nmodel name\t: {model}\nstepping\t: 1\n"
             "flags\t\t: {flags}\nbogomips\t: 4800.00\n\n")
    return "".join(entry.format(i=i, model=model, flags=f"{COMMON} {flags}") for i in range(processors))


SAPPHIRE_RAPIDS = cpuinfo_text("Intel(R) Xeon(R) Platinum 8480+",
                               "avx2 avx512f avx512dq avx512bw avx512_bf16 avx512_vnni amx_bf16 amx_tile amx_int8")
GENOA = cpuinfo_text("AMD EPYC 9B14 96-Core Processor", "avx2 avx512f avx512bw avx512_bf16 avx512_vnni")
MILAN = cpuinfo_text("AMD EPYC 7B13 64-Core Processor", "avx2 sha_ni vaes", processors=4)
GRAVITON = ("processor\t: 0\nBogoMIPS\t: 2100.00\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics "
            "sve bf16 i8mm\nCPU implementer\t: 0x41\nCPU part\t: 0xd40\n\n")
CPUS = {"amx": SAPPHIRE_RAPIDS, "avx512-bf16": GENOA, "avx2": MILAN, "arm-bf16": GRAVITON}


@pytest.fixture(autouse=True)
def no_real_measurement(monkeypatch):
    """A test that needs the bfloat16 measurement fakes it (`measured`); the real one would read this machine."""
    def refuse(*args, **kwargs):
        raise AssertionError("measure_bf16_over_fp32 ran for real in a test")

    monkeypatch.setattr(hardware, "measure_bf16_over_fp32", refuse)


@pytest.fixture
def measured(monkeypatch):
    """Fake the measurement: bfloat16 over float32 time for one row and for eight."""
    calls = []

    def use(one: float, eight: float):
        def measure(*args, **kwargs):
            calls.append(args)
            return {1: one, 8: eight}

        monkeypatch.setattr(hardware, "measure_bf16_over_fp32", measure)
        return calls

    return use


@pytest.fixture
def fake_cpu(monkeypatch):
    """Make `hardware.cpu_info()` return a parsed fake, with no GPU and the once-only warnings forgotten."""
    monkeypatch.setattr(hardware, "_WARNED", set())
    monkeypatch.setattr(hardware, "cuda_device", lambda index=None: None)

    def use(text: str) -> CpuInfo:
        info = parse_cpuinfo(text)
        monkeypatch.setattr(hardware, "cpu_info", lambda: info)
        return info

    return use


def test_parse_cpu_with_amx():
    info = parse_cpuinfo(SAPPHIRE_RAPIDS)
    assert info.model == "Intel Xeon Platinum 8480+"
    assert info.cores == 2
    assert (info.avx2, info.avx512f, info.avx512_bf16, info.amx) == (True, True, True, True)
    assert info.features() == ["avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"]


def test_parse_avx512_bf16_without_amx():
    info = parse_cpuinfo(GENOA)
    assert info.model == "AMD EPYC 9B14"
    assert (info.avx2, info.avx512f, info.avx512_bf16, info.amx) == (True, True, True, False)
    assert info.features() == ["avx2", "avx512f", "avx512_bf16"]


def test_parse_avx2_only():
    info = parse_cpuinfo(MILAN)
    assert info.model == "AMD EPYC 7B13"
    assert info.cores == 4
    assert (info.avx2, info.avx512f, info.avx512_bf16, info.amx) == (True, False, False, False)
    assert info.features() == ["avx2"]


def test_parse_arm_features_line():
    info = parse_cpuinfo(GRAVITON, cores=64)
    assert info.cores == 64
    assert info.features() == ["asimd", "sve", "bf16", "i8mm"]
    assert not info.amx


def test_half_amx_is_not_amx():
    """Both the tile unit and its bfloat16 instructions are needed."""
    assert not parse_cpuinfo(cpuinfo_text("Some CPU", "avx2 amx_tile")).amx


@pytest.mark.parametrize("name, fast", [("amx", True), ("avx2", False)])
def test_bf16_is_fast_with_amx_and_slow_with_avx2_only_without_measuring(name, fast):
    cpu = parse_cpuinfo(CPUS[name])
    assert bf16_is_fast("cpu", cpu=cpu) is fast
    assert bf16_is_fast(torch.device("cpu"), cpu=cpu) is fast
    message = slow_dtype_message("bfloat16", "cpu", hint="leave out --dtype bfloat16", cpu=cpu)
    assert (message is None) is fast
    assert slow_dtype_message("float32", "cpu", cpu=cpu) is None
    assert slow_dtype_message(None, "cpu", cpu=cpu) is None


@pytest.mark.parametrize("name", ["avx512-bf16", "arm-bf16"])
@pytest.mark.parametrize("one, eight, fast", [(0.8, 0.5, True), (1.05, 0.9, True), (1.6, 0.9, False),
                                              (0.9, 1.3, False)])
def test_bf16_dot_products_without_amx_are_measured(name, one, eight, fast, measured):
    calls = measured(one, eight)
    cpu = parse_cpuinfo(CPUS[name])
    assert bf16_is_fast("cpu", cpu=cpu) is fast
    message = slow_dtype_message("bfloat16", "cpu", cpu=cpu)
    assert (message is None) is fast
    if not fast:
        assert f"has no AMX; its bfloat16 products took {one:.2f}x (1 row) and {eight:.2f}x (8 rows) the float32 " \
               f"time: bfloat16 matmuls run slower than float32 here" in message
    assert calls


def test_slow_message_says_what_to_do_instead():
    message = slow_dtype_message(torch.bfloat16, "cpu", hint="leave out --dtype bfloat16", cpu=parse_cpuinfo(MILAN))
    assert message.startswith("this CPU (AMD EPYC 7B13) has no AMX and no bfloat16 dot products (avx512_bf16): "
                              "bfloat16 matmuls run slower than float32 here")
    assert "sample in float32 (leave out --dtype bfloat16)" in message


def test_float16_on_a_cpu_needs_amx_fp16():
    cpu = parse_cpuinfo(SAPPHIRE_RAPIDS)  # AMX for bfloat16, not for float16
    assert slow_dtype_message("bfloat16", "cpu", cpu=cpu) is None
    assert "has no AMX-FP16 and no AVX512-FP16: float16 matmuls run slower" in slow_dtype_message("float16", "cpu",
                                                                                                 cpu=cpu)


def test_other_devices_never_assumed_fast():
    assert not bf16_is_fast("mps", cpu=parse_cpuinfo(SAPPHIRE_RAPIDS))


def test_describe_in_one_line(fake_cpu):
    fake_cpu(GENOA)
    assert describe(threads=1) == (f"AMD EPYC 9B14, 2 cores, avx2 avx512f avx512_bf16, no AMX; "
                                   f"torch {torch.__version__.split('+')[0]} 1 thread")
    fake_cpu(SAPPHIRE_RAPIDS)
    assert describe(threads=2).startswith("Intel Xeon Platinum 8480+, 2 cores, avx2 avx512f avx512_bf16 amx_bf16 "
                                          "amx_tile, AMX; torch ")
    assert describe(threads=2).endswith(" 2 threads")


def test_without_proc_cpuinfo_the_flags_come_from_torch(monkeypatch):
    monkeypatch.setattr(hardware, "CPUINFO", "/nonexistent/cpuinfo")
    monkeypatch.setattr(hardware, "_torch_cpu_flags", lambda: frozenset({"avx2", "avx512f"}))
    hardware.cpu_info.cache_clear()
    try:
        info = hardware.cpu_info()
    finally:
        hardware.cpu_info.cache_clear()
    assert info.source == "torch"
    assert info.features() == ["avx2", "avx512f"]
    assert not info.amx  # torch's capability string says nothing about AMX: never assumed


def test_warning_is_logged_once(fake_cpu, caplog):
    fake_cpu(MILAN)
    with caplog.at_level(logging.WARNING, logger="llm2diff.hardware"):
        assert warn_if_slow_dtype("bfloat16", "cpu") is not None
        assert warn_if_slow_dtype("bfloat16", "cpu") is not None
    assert len(caplog.records) == 1


# -- the command line ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("hardware")
    adapted_with_saved_base(root).save_pretrained(root / "dlm")
    return root / "dlm"


def run_cli(command: str, model_dir, dtype: str | None, monkeypatch) -> int:
    argv = [command, "--model", str(model_dir), "--max-new-tokens", "4"]
    if command == "generate":
        argv += ["--prompt", "tom has 5 apples"]
    else:
        monkeypatch.setattr("sys.stdin", io.StringIO("tom has 5 apples\n"))
    return main(argv + (["--dtype", dtype] if dtype else []))


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_cli_warns_about_bfloat16_on_a_cpu_without_amx(command, model_dir, fake_cpu, monkeypatch, caplog, capsys):
    fake_cpu(MILAN)
    with caplog.at_level(logging.WARNING):
        assert run_cli(command, model_dir, "bfloat16", monkeypatch) == 0
    warnings = [r.getMessage() for r in caplog.records if r.name == "llm2diff.hardware"]
    assert len(warnings) == 1
    assert warnings[0].startswith("this CPU (AMD EPYC 7B13) has no AMX and no bfloat16 dot products (avx512_bf16): "
                                  "bfloat16 matmuls run slower than float32")
    assert "sample in float32 (--dtype float32)" in warnings[0]


@pytest.mark.parametrize("command", ["generate", "chat"])
@pytest.mark.parametrize("cpu, dtype", [("amx", "bfloat16"), ("avx2", "float32"), ("avx2", None)])
def test_cli_is_quiet_where_the_dtype_is_fast(command, cpu, dtype, model_dir, fake_cpu, monkeypatch, caplog, capsys):
    fake_cpu(CPUS[cpu])
    with caplog.at_level(logging.WARNING):
        assert run_cli(command, model_dir, dtype, monkeypatch) == 0
    assert not [r for r in caplog.records if r.name == "llm2diff.hardware"]


def test_cli_measures_an_avx512_bf16_cpu_and_stays_quiet_where_bf16_is_faster(model_dir, fake_cpu, measured,
                                                                              monkeypatch, caplog, capsys):
    fake_cpu(GENOA)
    calls = measured(0.8, 0.5)
    with caplog.at_level(logging.WARNING):
        assert run_cli("generate", model_dir, "bfloat16", monkeypatch) == 0
    assert calls
    assert not [r for r in caplog.records if r.name == "llm2diff.hardware"]


def test_nothing_is_imported_or_measured_at_import():
    import subprocess
    import sys

    code = ("import sys, llm2diff, llm2diff.hardware, llm2diff.cli; "
            "print('torch' in sys.modules, llm2diff.hardware.measure_bf16_over_fp32.cache_info().currsize)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "0"]


def test_measurement_gives_a_ratio_per_row_count():
    """Its shape only (tiny sizes, uncached call): the values are this machine's and not checked."""
    ratios = real_measure.__wrapped__(rows=(1, 2), size=32, layers=2, repeats=1)
    assert sorted(ratios) == [1, 2]
    assert all(r > 0 for r in ratios.values())
