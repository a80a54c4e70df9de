"""The CPU the kernels are compiled for, as Numba's code generator sees it.

Numba compiles for the host unless told otherwise: NUMBA_CPU_NAME names the CPU model and
NUMBA_CPU_FEATURES the feature string (`+avx2,-avx512f,...`); without NUMBA_CPU_FEATURES the
host's feature list applies, every feature spelled out (so NUMBA_CPU_NAME alone only changes
scheduling: the host's instructions stay enabled), except for NUMBA_CPU_NAME=generic, whose
features default to none. NUMBA_ENABLE_AVX=0 turns the host's AVX features off. The triple is the
process's (x86_64, aarch64, ...). `target()` reads the same settings the way
numba.core.codegen.JITCPUCodegen does (the tests check that the two agree), without creating
Numba's code generator, so importing the kernels still compiles nothing.

simd.py asks it whether the x86 AVX/AVX2 intrinsics and x86 inline asm may be emitted (otherwise
it writes the same computation as generic LLVM IR, which every backend lowers), and whether the
int8-activation kernels are worth running (simd.HAVE_AVX2). Numba's on-disk cache is keyed on the
same (triple, CPU, features), so code compiled for one target is never loaded for another.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

# The fastmath flags of the kernels that may reorder float operations (vectorized reductions).
# Every @njit function of the kernels names its fastmath explicitly, FM or False: a function that
# leaves it unset inherits its first caller's flags (Numba's ConfigStack, flags.inherit_if_not_set),
# and that compilation is the one the process, and the disk cache, keep for the signature. The
# prompt quantizer, shared by decode's (FM) and the prompt's (exact) paths, was compiled either way
# by whichever ran first: one-row and several-row steps then quantized differently (issue 16's CI).
FM = {"reassoc", "contract", "nsz", "arcp"}

# What a feature needs (LLVM's implications, the part that matters here): enabling one enables
# these, disabling one disables what needs it.
_NEEDS = {
    "sse2": ("sse",), "sse3": ("sse2",), "ssse3": ("sse3",), "sse4.1": ("ssse3",),
    "sse4.2": ("sse4.1",), "avx": ("sse4.2",), "f16c": ("avx",), "fma": ("avx",),
    "avx2": ("avx",), "avxvnni": ("avx2",), "avx512f": ("avx2", "f16c", "fma"),
}
_TRACKED = ("avx", "avx2", "f16c", "fma")
# int8 dot products with accumulation on 256-bit vectors (vpdpbusd, vpdpwssd): AVX-512 VNNI with
# AVX-512 VL (the EVEX form of the ymm instructions), or AVX-VNNI (the VEX form); LLVM lowers the
# same intrinsics to either
_VNNI_PARTS = ("avx512vnni", "avx512vl", "avxvnni")

# LLVM x86 CPU models and what they enable of _TRACKED, for a NUMBA_CPU_FEATURES that leaves a
# feature unsaid (e.g. empty); a model not listed here enables none of them.
_AVX512 = ("skylake-avx512 skx cascadelake cooperlake cannonlake icelake-client icelake-server "
           "rocketlake tigerlake sapphirerapids graniterapids graniterapids-d emeraldrapids "
           "diamondrapids knl knm znver4 znver5 x86-64-v4").split()
_AVX2 = ("haswell core-avx2 broadwell skylake alderlake raptorlake meteorlake arrowlake arrowlake-s "
         "arrowlake_s lunarlake pantherlake gracemont sierraforest grandridge clearwaterforest "
         "znver1 znver2 znver3 bdver4 x86-64-v3").split()
_FMA = "bdver2 bdver3".split()                   # AVX, FMA3, F16C, no AVX2
_F16C = "ivybridge core-avx-i btver2".split()
_AVX = "sandybridge corei7-avx bdver1".split()
_VNNI512 = ("cascadelake cooperlake icelake-client icelake-server rocketlake tigerlake sapphirerapids "
            "graniterapids graniterapids-d emeraldrapids diamondrapids znver4 znver5").split()
_AVXVNNI = ("alderlake raptorlake meteorlake arrowlake arrowlake-s arrowlake_s lunarlake pantherlake gracemont "
            "sierraforest grandridge clearwaterforest").split()
_CPU_FEATURES = {**{c: ("avx512f",) for c in _AVX512}, **{c: ("avx2", "f16c", "fma") for c in _AVX2},
                 **{c: ("f16c", "fma") for c in _FMA}, **{c: ("f16c",) for c in _F16C}, **{c: ("avx",) for c in _AVX}}
for _c in _VNNI512:
    _CPU_FEATURES[_c] = _CPU_FEATURES[_c] + ("avx512vnni", "avx512vl")
for _c in _AVXVNNI:
    _CPU_FEATURES[_c] = _CPU_FEATURES[_c] + ("avxvnni",)


@dataclass(frozen=True)
class Target:
    triple: str          # e.g. x86_64-unknown-linux-gnu, aarch64-unknown-linux-gnu
    cpu: str             # LLVM CPU model (znver4, haswell, x86-64, generic, neoverse-n1, ...)
    features: str        # the feature string given to LLVM (may be empty)
    x86: bool            # x86 inline asm ("=x" registers) may be emitted
    avx: bool            # 256-bit float ops: llvm.x86.avx.* intrinsics
    avx2: bool           # 256-bit integer ops: llvm.x86.avx2.* intrinsics
    f16c: bool           # x86's f16 -> f32 conversion (vcvtph2ps)
    fma: bool            # fused multiply-add in hardware: FMA3 on x86, every AArch64 CPU
    vnni: bool           # x86 vpdpbusd / vpdpwssd on ymm registers (AVX-512 VNNI + VL, or AVX-VNNI)
    fp16: bool           # f16 -> f32 in hardware: F16C on x86, every AArch64 CPU; otherwise LLVM
                         # would call __extendhfsf2, which Numba's JIT does not link (simd converts
                         # the bits itself then)

    @property
    def magic(self):
        """What Numba keys its cache on (CPUCodegen.magic_tuple())."""
        return (self.triple, self.cpu, self.features)


def _needs(f):
    if f in _NEEDS:
        return _NEEDS[f]
    if f.startswith("avx512"):
        return ("avx512f",)
    return ()


def x86_features(cpu: str, features: str) -> dict:
    """{avx, avx2, f16c, fma, vnni: bool} that LLVM enables for CPU model `cpu` with feature string
    `features` (applied in order after the model's own, as LLVM does)."""
    on: set = set()

    def enable(f):
        if f not in on:
            on.add(f)
            for g in _needs(f):
                enable(g)

    def disable(f):
        on.discard(f)
        for g in list(on):
            if f in _needs(g):
                disable(g)

    for f in _CPU_FEATURES.get(cpu.lower(), ()):
        enable(f)
    for tok in features.split(","):
        tok = tok.strip()
        if len(tok) > 1 and tok[0] in "+-":
            (enable if tok[0] == "+" else disable)(tok[1:])
    out = {f: f in on for f in _TRACKED}
    out["vnni"] = {"avx512vnni", "avx512vl"} <= on or "avxvnni" in on
    return out


def make_target(triple: str, cpu: str, features: str) -> Target:
    arch = triple.split("-", 1)[0].lower()
    x86 = arch in ("x86_64", "amd64", "i386", "i486", "i586", "i686")
    fs = x86_features(cpu, features) if x86 else dict.fromkeys(_TRACKED + ("vnni",), False)
    arm64 = arch in ("aarch64", "arm64", "aarch64_be")
    if not x86:
        fs["fma"] = arm64
    return Target(triple, cpu, features, x86, fp16=fs["f16c"] if x86 else arm64, **fs)


@functools.cache
def target() -> Target:
    """The target Numba's JIT compiles for in this process (read once: Numba reads its
    configuration at import and keeps it)."""
    import llvmlite.binding as ll
    from numba.core import codegen, config
    cpu = ll.get_host_cpu_name() if config.CPU_NAME is None else config.CPU_NAME
    features = config.CPU_FEATURES if config.CPU_FEATURES is not None else codegen.get_host_cpu_features()
    return make_target(ll.get_process_triple(), cpu, features)
