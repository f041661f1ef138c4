"""keel's own CPU kernels: matmuls of a few float32 rows by float32 / bfloat16 / int8 / int4 weights
(cpu_gemm.c), batched LoRA (cpu_lora.c) and the small ops of a decode step (cpu_decode.c).

Why: a decode step multiplies 1 to a few dozen rows by every weight. oneDNN and MKL are tuned for big
matrices; at these sizes a register-tiled loop that reads each weight once, in the format it is stored
in, is faster (bench/results/cpu_kernels.md). PyTorch's weight-only CPU operators (_weight_int8pack_mm,
_weight_int4pack_mm_for_cpu) have a fast path only for bfloat16 activations, so a float32 model would have to
round its activations around them, and bfloat16 F.linear on a CPU without bf16 instructions is slower
than float32. The C files are compiled with the system's C compiler at first use (a few seconds) into
a cache folder and loaded with ctypes, one build per ISA variant (AVX2, AVX-512), probed against
PyTorch before use; without a compiler, AVX2 or FMA, `kernels()` is None and the layers keep PyTorch's
operators. Which build (or none) an engine uses is decided once, by keel.kernels.backend.
KEEL_NO_CPU_KERNELS=1 turns them off.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading

import torch

log = logging.getLogger("keel.kernels")
HEADER = os.path.join(os.path.dirname(__file__), "cpu_simd.h")  # included by the sources
SOURCES = [os.path.join(os.path.dirname(__file__), f) for f in (
    "cpu_gemm.c", "cpu_lora.c", "cpu_decode.c", "cpu_stack.c")]
# Weight formats of CPUKernels.gemm (the enum of cpu_gemm.c)
W_F32, W_BF16, W_INT4, W_INT8G = 0, 1, 2, 3
_SCALE_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


class LoraW(ctypes.Structure):
    """keel_lora_w of cpu_stack.c: one projection's resident adapters (a NULL: none)."""
    _fields_ = [("a", ctypes.c_void_p), ("b", ctypes.c_void_p), ("out", ctypes.c_void_p), ("ranks", ctypes.c_void_p),
                ("scales", ctypes.c_void_p), ("n", ctypes.c_int64), ("max_rank", ctypes.c_int64),
                ("L", ctypes.c_int64), ("bf16", ctypes.c_int64)]


class LoraStep(ctypes.Structure):
    """keel_lora_step of cpu_stack.c: a step's adapter slots and the scratch they need."""
    _fields_ = [("slots", ctypes.c_void_p), ("start", ctypes.c_void_p), ("count", ctypes.c_void_p),
                ("ns", ctypes.c_int64), ("h", ctypes.c_void_p)]


class Lin(ctypes.Structure):
    """keel_lin of cpu_stack.c: one projection as keel_gemm reads it, and its adapters."""
    _fields_ = [("fmt", ctypes.c_int64), ("sdtype", ctypes.c_int64), ("group", ctypes.c_int64),
                ("n", ctypes.c_int64), ("k", ctypes.c_int64), ("w", ctypes.c_void_p), ("scale", ctypes.c_void_p),
                ("zero", ctypes.c_void_p), ("bias", ctypes.c_void_p), ("lora", LoraW)]


class Layer(ctypes.Structure):
    """keel_layer of cpu_stack.c: one decoder layer's weights and KV cache."""
    _fields_ = [("in_norm", ctypes.c_void_p), ("post_norm", ctypes.c_void_p), ("k_cache", ctypes.c_void_p),
                ("v_cache", ctypes.c_void_p), ("qkv", Lin), ("o", Lin), ("gate_up", Lin), ("down", Lin)]


def lin(fmt: int, w: torch.Tensor, scale: torch.Tensor | None = None, zero: torch.Tensor | None = None,
        group: int = 0, bias: torch.Tensor | None = None, lora=None) -> Lin:
    """A Lin over tensors the caller keeps alive (contiguous, float32 bias); lora: the projection's
    keel.lora.layers.LinearLoRA, whose stacks and tables stay where they are for its lifetime."""
    ptr = (lambda t: None if t is None else t.data_ptr())
    k = w.shape[1] * (2 if fmt == W_INT4 else 1)
    sdtype = 0 if scale is None else _SCALE_DTYPES[scale.dtype]
    adapters = LoraW()
    if lora is not None:
        a = lora.a
        adapters = LoraW(a.data_ptr(), ctypes.cast(lora._b_ptrs, ctypes.c_void_p), ctypes.cast(lora._out_sizes, ctypes.c_void_p),
                         lora._rank_table.data_ptr(), lora._scale_table.data_ptr(), len(lora._out_sizes),
                         a.shape[1] // len(lora._out_sizes), a.shape[0], int(a.dtype == torch.bfloat16))
    return Lin(fmt, sdtype, group, w.shape[0], k, w.data_ptr(), ptr(scale), ptr(zero), ptr(bias), adapters)
# Compiler flags per ISA variant. The same sources build both: the AVX-512 build lets the compiler use
# EVEX encodings and 32 vector registers (the kernels' intrinsics are 256-bit); the variants are kept
# apart so that a later 512-bit or VNNI kernel lands in one without touching the other.
COMMON_FLAGS = ["-O3", "-fopenmp", "-shared", "-fPIC", "-lm"]
ISA_FLAGS = {
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
    "avx512": ["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"],
}
# The CPU flags (as /proc/cpuinfo names them) each variant needs, best first.
ISA_NEEDS = {
    "avx512": {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq"},
    "avx2": {"avx2", "fma", "f16c"},
}
FLAGS = COMMON_FLAGS + ISA_FLAGS["avx2"]  # kept for callers that name the default build
_lock = threading.Lock()
_state: dict = {}


def _cache_dir() -> str:
    base = os.environ.get("KEEL_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "keel")
    return os.path.join(base, "kernels")


def runnable_isas(flags: set[str] | None = None) -> list[str]:
    """The ISA variants of keel's kernels this CPU can run, best first (none off Linux)."""
    if sys.platform != "linux":
        return []
    if flags is None:
        from keel.engine.device import cpu_flags
        flags = cpu_flags()
    return [isa for isa, needs in ISA_NEEDS.items() if needs <= flags]


def _compile(isa: str = "avx2") -> str | None:
    src = b""
    for path in SOURCES + [HEADER]:
        with open(path, "rb") as f:
            src += f.read()
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        log.warning("no C compiler (cc, gcc or $CC): keel's CPU kernels are off, PyTorch's operators serve")
        return None
    flags = COMMON_FLAGS + ISA_FLAGS[isa]
    tag = hashlib.blake2b(src + " ".join([cc, *flags]).encode(), digest_size=8).hexdigest()
    out = os.path.join(_cache_dir(), f"keel_cpu-{isa}-{tag}.so")
    if os.path.isfile(out):
        return out
    log.info("compiling keel's CPU kernels for %s (once; cached in %s)", isa, _cache_dir())
    try:
        os.makedirs(_cache_dir(), exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=_cache_dir())
    except OSError as e:  # a read-only home, say: serve with PyTorch's operators rather than not at all
        log.warning("keel's CPU kernels cannot be cached in %s (%s): using PyTorch's operators; set "
                    "KEEL_CACHE_DIR to a writable folder to use them", _cache_dir(), e)
        return None
    os.close(fd)
    try:
        subprocess.run([cc, *flags, *SOURCES, "-o", tmp], check=True, capture_output=True, timeout=120)
        os.replace(tmp, out)  # atomic: another process compiling the same file sees one or the other
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", b"") or b""
        log.warning("keel's CPU kernels (%s) did not compile (%s): %s", isa, e,
                    detail.decode(errors="replace")[-500:])
        if os.path.exists(tmp):
            os.remove(tmp)
        return None
    return out


ENOMEM, EINVAL = -1, -2  # KEEL_ENOMEM, KEEL_EINVAL of cpu_simd.h


class KernelArgumentError(ValueError):
    """A kernel refused its arguments: keel called it against its preconditions (a bug, not user input)."""


def _check(rc: int, what: str) -> None:
    if rc == EINVAL:
        raise KernelArgumentError(f"keel's {what} kernel refused its arguments (a precondition in keel/kernels/"
                                  f"cpu_*.c: shapes, multiples of 8 or 16, context lengths)")
    if rc != 0:
        raise MemoryError(f"keel's {what} kernel could not allocate its scratch memory")


class CPUKernels:
    def __init__(self, path: str, isa: str = "avx2") -> None:
        self.isa = isa
        lib = ctypes.CDLL(path)
        p, i64, c_int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        lib.keel_gemm.argtypes = [p, c_int, p, p, p, c_int, i64, p, i64, i64, i64, c_int]
        lib.keel_gemm.restype = c_int
        lib.keel_rms_norm.argtypes = [p, p, p, i64, i64, ctypes.c_float]
        lib.keel_rms_norm.restype = None
        lib.keel_decode_attention_f32.argtypes = [p, i64, p, p, p, p, p, i64, i64, i64, i64, i64, i64,
                                                  ctypes.c_float, c_int]
        lib.keel_decode_attention_f32.restype = c_int
        lib.keel_prefill_attention_f32.argtypes = [p, i64, p, p, p, p, p, p, p, i64, i64, p, i64, i64, i64, i64,
                                                   i64, ctypes.c_float, c_int]
        lib.keel_prefill_attention_f32.restype = c_int
        lib.keel_silu_mul_f32.argtypes = [p, p, i64, i64]
        lib.keel_rope_cache_f32.argtypes = [p, p, p, p, p, p, i64, i64, i64, i64]
        lib.keel_silu_mul_f32.restype = lib.keel_rope_cache_f32.restype = None
        lib.keel_decode_stack.argtypes = [p, i64, p, i64, i64, i64, i64, i64, i64, ctypes.c_float, ctypes.c_float,
                                          p, p, p, p, i64, p, i64, p, c_int]
        lib.keel_decode_stack.restype = c_int
        for f in (lib.keel_lora_f32, lib.keel_lora_bf16):
            f.argtypes = [p, p, p, p, p, p, p, p, p, p, p, i64, i64, i64, i64, i64, i64, c_int]
            f.restype = None
        self.lib = lib

    def gemm(self, x: torch.Tensor, fmt: int, w: torch.Tensor, scale: torch.Tensor | None = None,
             zero: torch.Tensor | None = None, group: int = 0) -> torch.Tensor:
        """x float32 [M, K] contiguous times wᵀ -> float32 [M, N], w [N, ...] stored as `fmt` (see
        cpu_gemm.c): W_F32 / W_BF16 [N, K]; W_INT4 packed uint8 [N, K / 2] with scale and zero
        [N, K / group]; W_INT8G int8 [N, K] with scale [N, K / group]. Scales and zeros float32, bfloat16 or
        float16, both of one dtype. All contiguous."""
        m, k = x.shape
        n = w.shape[0]
        y = torch.empty(m, n, dtype=torch.float32)
        sdtype = 0 if scale is None else _SCALE_DTYPES[scale.dtype]
        if zero is not None and zero.dtype != scale.dtype:
            raise TypeError("scale and zero must have one dtype")
        rc = self.lib.keel_gemm(x.data_ptr(), fmt, w.data_ptr(), None if scale is None else scale.data_ptr(),
                                None if zero is None else zero.data_ptr(), sdtype, group, y.data_ptr(), m, n, k,
                                torch.get_num_threads())
        _check(rc, "matmul")
        return y

    def decode_stack(self, layers, x: torch.Tensor, dims: tuple, eps: float, scale: float, cos: torch.Tensor,
                     sin: torch.Tensor, slots: torch.Tensor, tables: torch.Tensor, context_lens: torch.Tensor,
                     block_size: int, lora: "LoraStep | None" = None) -> None:
        """Run x float32 [M, D] (contiguous, updated in place) through every decoder layer of `layers` (a
        ctypes array of Layer) for one decode step; dims (D, H, KVH, HD, I). See cpu_stack.c."""
        m = x.shape[0]
        rc = self.lib.keel_decode_stack(layers, len(layers), x.data_ptr(), m, *dims, eps, scale, cos.data_ptr(),
                                        sin.data_ptr(), slots.data_ptr(), tables.data_ptr(), tables.shape[1],
                                        context_lens.data_ptr(), block_size,
                                        None if lora is None else ctypes.byref(lora), torch.get_num_threads())
        _check(rc, "decode-step")

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """x float32 [..., D] contiguous, weight float32 [D] -> RMSNorm(x) * weight."""
        y = torch.empty_like(x)
        d = x.shape[-1]
        self.lib.keel_rms_norm(x.data_ptr(), weight.data_ptr(), y.data_ptr(), x.numel() // d, d, eps)
        return y

    def lora(self, x: torch.Tensor, y: torch.Tensor, h: torch.Tensor, a: torch.Tensor, b_ptrs, out_sizes,
             ranks: torch.Tensor, scales: torch.Tensor, slots: torch.Tensor, starts: torch.Tensor,
             counts: torch.Tensor) -> None:
        """y += every listed slot's LoRA update of its rows of x (float32, contiguous; see cpu_lora.c).
        a: [L, max_rank * n, in] float32 or bfloat16; b_ptrs: ctypes array of the n b stacks' addresses
        ([L, max_rank, out_k], a's dtype); out_sizes: ctypes int64 array of out_k; ranks int32 and scales
        float32 [n, L]; slots, starts, counts int32 [M]; h: float32 scratch [rows of x, max_rank * n]."""
        L, hr, k = a.shape
        n = len(out_sizes)
        fn = self.lib.keel_lora_bf16 if a.dtype == torch.bfloat16 else self.lib.keel_lora_f32
        fn(x.data_ptr(), y.data_ptr(), h.data_ptr(), a.data_ptr(), b_ptrs, out_sizes, ranks.data_ptr(),
           scales.data_ptr(), slots.data_ptr(), starts.data_ptr(), counts.data_ptr(), slots.shape[0], n, k,
           y.shape[1], hr // n, L, torch.get_num_threads())

    def decode_attention(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         tables: torch.Tensor, context_lens: torch.Tensor, block_size: int,
                         scale: float) -> torch.Tensor:
        """One query token per request over the paged cache (see cpu_decode.c), float32.
        q: [B, H, D] with unit strides in its last two dims; caches [slots, KVH, D] contiguous;
        tables int64 [B, NB]; context_lens int32 [B] -> [B, H * D]."""
        B, H, D = q.shape
        kvh = k_cache.shape[1]
        out = torch.empty(B, H * D, dtype=torch.float32)
        rc = self.lib.keel_decode_attention_f32(
            q.data_ptr(), q.stride(0), k_cache.data_ptr(), v_cache.data_ptr(), tables.data_ptr(),
            context_lens.data_ptr(), out.data_ptr(), B, H, kvh, D, block_size, tables.shape[1], scale,
            torch.get_num_threads())
        _check(rc, "decode attention")
        return out

    def prefill_attention(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          tables: torch.Tensor, context_lens: torch.Tensor, items: tuple, block_size: int,
                          scale: float) -> torch.Tensor:
        """Every token of a step as a query over its own causal context, each computed exactly as
        decode_attention computes a token at that position (see cpu_decode.c). q: [T, H, D] as for
        decode_attention, tokens grouped by request; items: (query lens int32 [B], first rows int64 [B],
        work items int64 [n, 2]) from AttentionMetadata.prefill_items -> [T, H * D]."""
        T, H, D = q.shape
        kvh = k_cache.shape[1]
        qlen, first, work = items
        out = torch.empty(T, H * D, dtype=torch.float32)
        rc = self.lib.keel_prefill_attention_f32(
            q.data_ptr(), q.stride(0), k_cache.data_ptr(), v_cache.data_ptr(), tables.data_ptr(),
            context_lens.data_ptr(), qlen.data_ptr(), first.data_ptr(), work.data_ptr(), work.shape[0], qlen.shape[0],
            out.data_ptr(), H, kvh, D, block_size, tables.shape[1], scale, torch.get_num_threads())
        _check(rc, "prefill attention")
        return out

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """gate_up float32 [M, 2 I] contiguous -> silu(gate) * up [M, I]."""
        m, i2 = gate_up.shape
        out = torch.empty(m, i2 // 2, dtype=torch.float32)
        self.lib.keel_silu_mul_f32(gate_up.data_ptr(), out.data_ptr(), m, i2 // 2)
        return out

    def rope_and_cache(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, slots: torch.Tensor,
                       k_cache: torch.Tensor, v_cache: torch.Tensor, heads: int, kv_heads: int) -> None:
        """Rotate the q and k heads of qkv float32 [T, (H + 2 KVH) * D] in place (rotate-half), then write
        k and v to the caches [slots, KVH, D] at slots int64 [T]; cos, sin float32 [T, D / 2] contiguous."""
        t, d = qkv.shape[0], k_cache.shape[2]
        self.lib.keel_rope_cache_f32(qkv.data_ptr(), cos.data_ptr(), sin.data_ptr(), slots.data_ptr(),
                                     k_cache.data_ptr(), v_cache.data_ptr(), t, heads, kv_heads, d)


def probe(k: "CPUKernels") -> str | None:
    """Run each kernel family once on small inputs against PyTorch: None if they agree, else what
    differs. A build that computes something else (a miscompile, a CPU that misreports its flags)
    must never serve."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 64, generator=g)
    w = torch.randn(24, 64, generator=g)
    want = x @ w.t()
    if not torch.allclose(k.gemm(x, W_F32, w), want, rtol=1e-4, atol=1e-4):
        return "float32 matmul"
    if not torch.allclose(k.gemm(x, W_BF16, w.bfloat16()), x @ w.bfloat16().float().t(), rtol=1e-4, atol=1e-4):
        return "bfloat16 matmul"
    norm = torch.ones(64)
    if not torch.allclose(k.rms_norm(x, norm, 1e-6), torch.nn.functional.rms_norm(x, (64,), norm, 1e-6),
                          rtol=1e-5, atol=1e-5):
        return "rms_norm"
    gu = torch.randn(3, 32, generator=g)
    if not torch.allclose(k.silu_mul(gu), torch.nn.functional.silu(gu[:, :16]) * gu[:, 16:], rtol=1e-5, atol=1e-6):
        return "silu_mul"
    return None


def kernels(isa: str | None = None) -> CPUKernels | None:
    """keel's CPU kernels built for `isa` ("avx2", "avx512"; None: the best this CPU runs), or None where
    they cannot run here: off Linux, a CPU without the ISA, no compiler, an unwritable cache, a build or
    load error, or a probe that computes something else. Each failure is logged once; built and
    probed once per process and variant. KEEL_NO_CPU_KERNELS=1: always None."""
    if os.environ.get("KEEL_NO_CPU_KERNELS"):
        return None
    isas = runnable_isas()
    if isa is None:
        if not isas:
            return None
        isa = isas[0]
    with _lock:
        if isa not in _state:
            _state[isa] = _build(isa, isas)
        return _state[isa]


def _build(isa: str, runnable: list[str]) -> CPUKernels | None:
    if isa not in ISA_FLAGS:
        raise ValueError(f"unknown ISA variant {isa!r}: one of {', '.join(ISA_FLAGS)}")
    if isa not in runnable:
        log.info("this CPU cannot run keel's %s kernels", isa)
        return None
    path = _compile(isa)
    if path is None:
        return None
    try:
        k = CPUKernels(path, isa)
    except OSError as e:
        log.warning("keel's CPU kernels (%s) did not load (%s)", isa, e)
        return None
    bad = probe(k)
    if bad is not None:
        log.warning("keel's CPU kernels (%s) computed a wrong %s on a probe: not used", isa, bad)
        return None
    return k
