"""What this machine computes with, and whether bfloat16 is the fast dtype on it.

The speed of the block sampler against its AR parent depends on the hardware more than on anything else. A pass
over a block of 8-16 positions costs about one token's pass in bfloat16 on a CPU with AMX (Intel's bfloat16 matrix
tiles, 4th-generation Xeon and later) or on a GPU. A CPU without bfloat16 instructions (AVX2 only) converts in
software, so `--dtype bfloat16` there makes everything slower (verified decoding measured 0.55x the parent in
bfloat16 against 1.64x in float32 on an AVX2 AMD EPYC). CPUs with bfloat16 dot products but no AMX (avx512_bf16:
AMD Zen 4, Intel Cooper Lake; ARM's bf16) lie in between and are measured once (a quarter of a second) when asked.

    from llm2diff.hardware import describe, bf16_is_fast, warn_if_slow_dtype
    describe()                 # "AMD EPYC, 2 cores, avx2 avx512f avx512_bf16, no AMX; torch 2.13.0 1 thread"
    bf16_is_fast("cpu")        # True with AMX, False with AVX2 only, measured in between
    warn_if_slow_dtype("bfloat16", "cpu", hint="leave out --dtype bfloat16")   # logs one warning per process

CPU features come from /proc/cpuinfo on Linux and from `torch.backends.cpu.get_cpu_capability()` elsewhere (which
reports vector width only, so AMX is never assumed there). Nothing runs at import: every function reads lazily and
caches what it read or measured.
"""

from __future__ import annotations

import functools
import logging
import os
import platform
import sys
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

CPUINFO = "/proc/cpuinfo"
# the features that decide matmul speed, in the order a description lists them
X86_FEATURES = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "amx_fp16")
ARM_FEATURES = ("asimd", "sve", "sve2", "bf16", "i8mm")
AMX_FLAGS = ("amx_bf16", "amx_tile")


@dataclass(frozen=True)
class CpuInfo:
    """A CPU's model name, logical core count and the instruction-set flags that were found."""

    model: str
    cores: int | None = None
    flags: frozenset[str] = field(default_factory=frozenset, repr=False)
    source: str = CPUINFO  # where the flags came from: /proc/cpuinfo, torch, or nothing

    def has(self, flag: str) -> bool:
        return flag in self.flags

    @property
    def avx2(self) -> bool:
        return self.has("avx2")

    @property
    def avx512f(self) -> bool:
        return self.has("avx512f")

    @property
    def avx512_bf16(self) -> bool:
        return self.has("avx512_bf16")

    @property
    def amx(self) -> bool:
        """bfloat16 matrix tiles (Intel AMX): with them a bfloat16 pass over a block costs about a token's pass."""
        return all(self.has(flag) for flag in AMX_FLAGS)

    def features(self) -> list[str]:
        """The relevant flags present, in a fixed order (x86 or ARM)."""
        return [flag for flag in X86_FEATURES + ARM_FEATURES if self.has(flag)]


def parse_cpuinfo(text: str, cores: int | None = None) -> CpuInfo:
    """A `CpuInfo` from the text of /proc/cpuinfo (x86 `flags` or ARM `Features`; the first processor's entry).
    `cores` defaults to the number of `processor` entries."""
    model, flags, processors = None, None, 0
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key, value = key.strip().lower(), value.strip()
        if key == "processor":
            processors += 1
        elif key in ("model name", "hardware", "cpu model") and model is None and value:
            model = value
        elif key in ("flags", "features") and flags is None:
            flags = frozenset(value.lower().split())
    model = _short_model_name(model) if model else (platform.processor() or platform.machine() or "unknown CPU")
    return CpuInfo(model=model, cores=cores if cores is not None else (processors or None),
                   flags=flags or frozenset(), source=CPUINFO)


def _short_model_name(name: str) -> str:
    """'AMD EPYC 7B13 64-Core Processor' -> 'AMD EPYC 7B13'; 'Intel(R) Xeon(R) Platinum 8480+' -> 'Intel Xeon
    Platinum 8480+'."""
    for noise in ("(R)", "(r)", "(TM)", "(tm)", " CPU", " Processor"):
        name = name.replace(noise, "")
    words = [w for w in name.split() if not w.endswith("-Core") and w != "@" and not w.endswith("GHz")]
    return " ".join(words) or name


def _torch_cpu_flags() -> frozenset[str]:
    """Vector features from torch's own dispatch check (no AMX information): the fallback off Linux."""
    try:
        import torch

        capability = torch.backends.cpu.get_cpu_capability()
    except Exception:  # noqa: BLE001 - an old or partial torch: report no flags rather than fail a benchmark
        return frozenset()
    return frozenset({"AVX2": ("avx2",), "AVX512": ("avx2", "avx512f"), "SVE256": ("asimd", "sve")}
                     .get(capability, ()))


@functools.lru_cache(maxsize=1)
def cpu_info() -> CpuInfo:
    """This machine's CPU: /proc/cpuinfo on Linux, else the platform's name and torch's vector capability."""
    cores = os.cpu_count()
    if sys.platform.startswith("linux") and os.path.isfile(CPUINFO):
        try:
            with open(CPUINFO, encoding="utf-8", errors="replace") as f:
                info = parse_cpuinfo(f.read(), cores=cores)
            if info.flags:
                return info
        except OSError:
            pass
    model = platform.processor() or platform.machine() or "unknown CPU"
    if sys.platform == "darwin":
        model = _sysctl("machdep.cpu.brand_string") or model
    flags = _torch_cpu_flags()
    return CpuInfo(model=_short_model_name(model), cores=cores, flags=flags, source="torch" if flags else "none")


def _sysctl(name: str) -> str | None:
    import subprocess

    try:
        out = subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, timeout=2, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def cuda_device(index: int | None = None) -> str | None:
    """The CUDA device's name, or None without a usable CUDA device (or without torch's CUDA build)."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        return torch.cuda.get_device_name(torch.cuda.current_device() if index is None else index)
    except Exception:  # noqa: BLE001 - a broken driver reads as "no GPU" here; torch raises its own error on use
        return None


def cuda_bf16_native(index: int | None = None) -> bool:
    """Whether the CUDA device multiplies bfloat16 natively (compute capability 8.0, Ampere, and later)."""
    import torch

    major, _ = torch.cuda.get_device_capability(torch.cuda.current_device() if index is None else index)
    return major >= 8


def _device_type(device) -> str:
    """'cpu', 'cuda', 'mps', ... from a torch.device, a string such as 'cuda:0', or None (the default device)."""
    if device is None:
        return "cuda" if cuda_device() is not None else "cpu"
    return str(getattr(device, "type", device)).split(":")[0]


def _device_index(device) -> int | None:
    index = getattr(device, "index", None)
    if index is None and isinstance(device, str) and ":" in device:
        index = int(device.split(":", 1)[1])
    return index


BF16_DOT_FLAGS = ("avx512_bf16", "bf16")  # bfloat16 dot products without tiles (x86 AVX-512, ARM): measured
MEASURED_ROWS = (1, 8)  # a one-token pass (the AR parent) and a block pass (the sampler)
TOLERANCE = 1.1  # bfloat16 counts as fast when it takes at most this times float32's time (timing noise)


@functools.lru_cache(maxsize=4)
def measure_bf16_over_fp32(rows: tuple[int, ...] = MEASURED_ROWS, size: int = 1536, layers: int = 8,
                           repeats: int = 5) -> dict[int, float]:
    """bfloat16 time over float32 time of `layers` linear products (size x size weights, together larger than a
    CPU cache, like a model's weights) for each row count, median of `repeats`, at torch's current thread count.
    About a quarter of a second, run once per process and only when asked (never at import)."""
    import statistics
    import time

    import torch

    weights = {dtype: [torch.full((size, size), 0.01, dtype=dtype) for _ in range(layers)]
               for dtype in (torch.float32, torch.bfloat16)}
    times: dict[tuple, list[float]] = {(dtype, n): [] for dtype in weights for n in rows}
    with torch.inference_mode():
        for repeat in range(repeats + 1):  # the first round warms up
            for n in rows:
                for dtype, stack in weights.items():  # interleaved: a change in machine load hits both
                    x = torch.full((n, size), 0.5, dtype=dtype)
                    start = time.perf_counter()
                    for w in stack:
                        torch.nn.functional.linear(x, w)
                    if repeat:
                        times[(dtype, n)].append(time.perf_counter() - start)
    return {n: statistics.median(times[(torch.bfloat16, n)]) / statistics.median(times[(torch.float32, n)])
            for n in rows}


def cpu_bf16_verdict(cpu: CpuInfo | None = None) -> tuple[bool, str]:
    """(whether bfloat16 matmuls are the fast ones on this CPU, why). With AMX: yes. Without bfloat16 dot products
    (AVX2, AVX-512 without avx512_bf16): no, bfloat16 is converted in software and runs 2-5x slower. With them but
    without AMX (AMD Zen 4, Intel Cooper Lake, ARM with bf16): it depends on the chip, so it is measured
    (`measure_bf16_over_fp32`): fast when neither a one-row nor an eight-row product takes longer than in float32
    (within 10%)."""
    cpu = cpu or cpu_info()
    if cpu.amx:
        return True, "has AMX"
    if not any(cpu.has(flag) for flag in BF16_DOT_FLAGS):
        return False, "has no AMX and no bfloat16 dot products (avx512_bf16)"
    ratios = measure_bf16_over_fp32()
    measured = " and ".join(f"{ratios[n]:.2f}x ({n} row{'s' if n > 1 else ''})" for n in sorted(ratios))
    return (all(r <= TOLERANCE for r in ratios.values()),
            f"has no AMX; its bfloat16 products took {measured} the float32 time")


def bf16_is_fast(device=None, cpu: CpuInfo | None = None) -> bool:
    """Whether bfloat16 matmuls are expected to be at least as fast as float32 ones on `device` (default: the GPU if
    there is one, else the CPU). CUDA: a GPU with native bfloat16 (Ampere or later). CPU: `cpu_bf16_verdict` (AMX
    yes, AVX2 no, AVX-512 bfloat16 without AMX measured once). Other devices (MPS, ...): not assumed."""
    kind = _device_type(device)
    if kind == "cuda":
        return cuda_bf16_native(_device_index(device))
    if kind == "cpu":
        return cpu_bf16_verdict(cpu)[0]
    return False


def slow_dtype_message(dtype, device=None, hint: str = "leave out --dtype", cpu: CpuInfo | None = None) -> str | None:
    """What to tell a user who asked for `dtype` (a name or a torch dtype) on `device`, when it is the slow choice
    there; None when it is not (float32; bfloat16 with AMX, on a recent GPU, or where measured fast). `hint` says
    how to change it."""
    name = str(dtype).replace("torch.", "") if dtype is not None else None
    if name not in ("bfloat16", "float16"):
        return None
    kind = _device_type(device)
    if kind == "cpu":
        cpu = cpu or cpu_info()
        if name == "bfloat16":
            fast, why = cpu_bf16_verdict(cpu)
        else:  # float16 products are fast on a CPU only with AMX-FP16 or AVX512-FP16 (Intel Sapphire Rapids on)
            fast = cpu.has("amx_fp16") or cpu.has("avx512_fp16")
            why = "has no AMX-FP16 and no AVX512-FP16"
        if fast:
            return None
        return (f"this CPU ({cpu.model}) {why}: {name} matmuls run slower than float32 here, so sampling in {name} "
                f"is slower, not faster; sample in float32 ({hint}). {name} pays off on CPUs with AMX (Intel Xeon "
                f"4th generation and later) and on GPUs.")
    if kind == "cuda" and name == "bfloat16" and not bf16_is_fast(device):
        return (f"this GPU ({cuda_device(_device_index(device))}) has no native bfloat16 (compute capability below "
                f"8.0): bfloat16 runs emulated and slow here; use float16 or float32 ({hint}).")
    return None


_WARNED: set[tuple[str, str]] = set()


def warn_if_slow_dtype(dtype, device=None, hint: str = "leave out --dtype") -> str | None:
    """Log `slow_dtype_message` as a warning, once per process for each dtype and device kind. Returns it."""
    message = slow_dtype_message(dtype, device, hint=hint)
    key = (str(dtype), _device_type(device))
    if message is not None and key not in _WARNED:
        _WARNED.add(key)
        logger.warning(message)
    return message


def describe(threads: int | None = None, device=None) -> str:
    """One line for a benchmark table's header: CPU model, cores, matmul features, the GPU if any, torch version and
    threads, e.g. 'AMD EPYC, 2 cores, avx2 avx512f avx512_bf16, no AMX; torch 2.13.0 1 thread'. `threads` defaults
    to torch's current setting; `device` 'cpu' leaves the GPU out."""
    import torch

    cpu = cpu_info()
    features = " ".join(cpu.features()) or ("no flags read" if cpu.source == "none" else "no AVX2")
    cores = f"{cpu.cores} cores, " if cpu.cores else ""
    parts = [f"{cpu.model}, {cores}{features}, {'AMX' if cpu.amx else 'no AMX'}"]
    if _device_type(device) != "cpu":
        gpu = cuda_device(_device_index(device))
        if gpu is not None:
            parts.append(f"CUDA {gpu} ({'bf16' if cuda_bf16_native(_device_index(device)) else 'no native bf16'}, "
                         f"CUDA {torch.version.cuda})")
    threads = torch.get_num_threads() if threads is None else threads
    parts.append(f"torch {torch.__version__.split('+')[0]} {threads} thread{'s' if threads != 1 else ''}")
    return "; ".join(parts)
