"""keel's own CPU kernels: matmuls of a few float32 rows by float32 / bfloat16 / int8 / int4 weights
(cpu_gemm.c), batched LoRA (cpu_lora.c) and the small ops of a decode step (cpu_decode.c).

Why: a decode step multiplies 1 to a few dozen rows by every weight. oneDNN and MKL are tuned for big
matrices; at these sizes a register-tiled loop that reads each weight once, in the format it is stored
in, is faster (bench/results/cpu_kernels.md). PyTorch's weight-only CPU operators (_weight_int8pack_mm,
_weight_int4pack_mm_for_cpu) have a fast path only for bfloat16 activations, so a float32 model had to
round its activations around them, and bfloat16 F.linear on a CPU without bf16 instructions is slower
than float32. The C files are compiled with the system's C compiler at first use (a few seconds) into
a cache folder and loaded with ctypes; without a compiler, AVX2 or FMA, `kernels()` is None and the
layers keep PyTorch's operators. KEEL_NO_CPU_KERNELS=1 turns them off.
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
FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC", "-lm"]
_lock = threading.Lock()
_state: dict = {}


def _cache_dir() -> str:
    base = os.environ.get("KEEL_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "keel")
    return os.path.join(base, "kernels")


def _supported() -> bool:
    if os.environ.get("KEEL_NO_CPU_KERNELS") or sys.platform != "linux":
        return False
    from keel.engine.device import cpu_flags
    return {"avx2", "fma", "f16c"} <= cpu_flags()


def _compile() -> str | None:
    src = b""
    for path in SOURCES + [HEADER]:
        with open(path, "rb") as f:
            src += f.read()
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        log.info("no C compiler: keel's CPU kernels are off")
        return None
    tag = hashlib.blake2b(src + " ".join([cc, *FLAGS]).encode(), digest_size=8).hexdigest()
    out = os.path.join(_cache_dir(), f"keel_cpu-{tag}.so")
    if os.path.isfile(out):
        return out
    log.info("compiling keel's CPU kernels (once; cached in %s)", _cache_dir())
    try:
        os.makedirs(_cache_dir(), exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=_cache_dir())
    except OSError as e:  # a read-only home, say: serve with PyTorch's operators rather than not at all
        log.warning("keel's CPU kernels cannot be cached in %s (%s): using PyTorch's operators; set "
                    "KEEL_CACHE_DIR to a writable folder to use them", _cache_dir(), e)
        return None
    os.close(fd)
    try:
        subprocess.run([cc, *FLAGS, *SOURCES, "-o", tmp], check=True, capture_output=True, timeout=120)
        os.replace(tmp, out)  # atomic: another process compiling the same file sees one or the other
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", b"") or b""
        log.warning("keel's CPU kernels did not compile (%s): using PyTorch's operators. %s", e,
                    detail.decode(errors="replace")[-500:])
        if os.path.exists(tmp):
            os.remove(tmp)
        return None
    return out


class CPUKernels:
    def __init__(self, path: str) -> None:
        lib = ctypes.CDLL(path)
        p, i64, c_int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        lib.keel_gemm.argtypes = [p, c_int, p, p, p, c_int, i64, p, i64, i64, i64, c_int]
        lib.keel_gemm.restype = c_int
        lib.keel_rms_norm.argtypes = [p, p, p, i64, i64, ctypes.c_float]
        lib.keel_rms_norm.restype = None
        lib.keel_decode_attention_f32.argtypes = [p, i64, p, p, p, p, p, i64, i64, i64, i64, i64, i64,
                                                  ctypes.c_float, c_int]
        lib.keel_decode_attention_f32.restype = c_int
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
        if rc != 0:
            raise MemoryError("keel's matmul kernel could not allocate its scratch buffer")
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
        if rc != 0:
            raise MemoryError("keel's decode-step kernel could not allocate its buffers")

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
        if rc != 0:
            raise MemoryError("keel's decode attention kernel could not allocate its scratch buffer")
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


def kernels() -> CPUKernels | None:
    """The compiled kernels, or None where they cannot run here (built once per process)."""
    with _lock:
        if "k" not in _state:
            k = None
            if _supported():
                path = _compile()
                if path is not None:
                    try:
                        k = CPUKernels(path)
                    except OSError as e:
                        log.warning("keel's CPU kernels did not load (%s): using PyTorch's operators", e)
            _state["k"] = k
        return _state["k"]
