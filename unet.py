"""
The Stable Diffusion v1 U-Net (the noise predictor eps(x_t, t, text)), with configurable block removal
as in BK-SDM: fewer (resnet, attention) pairs per stage, no mid-block, fewer stages.

References
1) Rombach et al., "High-Resolution Image Synthesis with Latent Diffusion Models", arXiv 2112.10752.
2) Kim et al., "BK-SDM: A Lightweight, Fast, and Cheap Version of Stable Diffusion", arXiv 2305.15798:
   base = 1 pair per down stage and 2 per up stage, small = base without the mid-block,
   tiny = small without the innermost stage.
3) Numerical reference: diffusers `UNet2DConditionModel` (models/unets/unet_2d_condition.py).
Checkpoint format: parameter names are exactly diffusers' (`down_blocks.1.attentions.0.proj_in.weight`),
so the official diffusers-layout U-Nets (SD v1.4/v1.5 `unet/`, nota-ai/bk-sdm-*) load with
`load_state_dict(strict=True)` and no renaming. The CompVis single-file names go through convert_weights.py.

This file also holds the project's one attention function, `attention()`, which the VAE reuses; its native
kernels, and the fp32 convolutions' Winograd transforms, are native.c, which this file builds and loads.
"""
import argparse
import ctypes
import functools
import hashlib
import math
import os
import platform
import subprocess
import warnings
import weakref
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.weak import WeakIdKeyDictionary
from torch.utils.checkpoint import checkpoint

# -----------------------------------------------------------------------------
# Attention: softmax(q k^T / sqrt(d)) v, our own kernels beside torch's SDPA


def tiled_attention(q, k, v, q_chunk=1024, k_chunk=1024):
    """Exact attention in O(N) memory: never builds the Lq x Lk score matrix, only q_chunk x k_chunk tiles.

    For each query tile we walk over the key tiles keeping, per query, the running max m of the scores,
    the running softmax denominator l and the running numerator acc = sum_j exp(s_j - m) v_j. When a new
    tile raises the max from m to m', the old sums are rescaled by exp(m - m') (the "online softmax" of
    Milakov & Gimelshein 2018, as used by FlashAttention). q, k, v: (B, heads, L, d).
    """
    scale = q.shape[-1] ** -0.5
    out = torch.empty_like(q)
    for i in range(0, q.shape[-2], q_chunk):
        qi = q[..., i:i + q_chunk, :] * scale
        m = torch.full(qi.shape[:-1] + (1,), -math.inf, device=q.device, dtype=torch.float32)
        l = torch.zeros_like(m)
        acc = torch.zeros(qi.shape, device=q.device, dtype=torch.float32)
        for j in range(0, k.shape[-2], k_chunk):
            s = (qi @ k[..., j:j + k_chunk, :].transpose(-1, -2)).float()  # (B, heads, q_chunk, k_chunk)
            m_new = torch.maximum(m, s.amax(dim=-1, keepdim=True))
            p = torch.exp(s - m_new)
            rescale = torch.exp(m - m_new)  # exp(-inf) = 0 on the first tile
            l = l * rescale + p.sum(dim=-1, keepdim=True)
            acc = acc * rescale + p.to(v.dtype) @ v[..., j:j + k_chunk, :]
            m = m_new
        out[..., i:i + q_chunk, :] = acc / l
    return out


@functools.cache
def fused_attention():
    """tiled_attention compiled by torch.compile: the loop's many small kernels fused into few (C++ on a CPU, Triton
    on CUDA), compiled once per shape on first use. Query tiles of 256 measured fastest compiled on a CPU; timed
    against SDPA in BENCHMARKS.md ("Our attention, fused")."""
    return torch.compile(functools.partial(tiled_attention, q_chunk=256), dynamic=False)


# native.c, built at first use: the same online softmax in one pass of native code (fp32 on AVX-512, bf16 on AMX),
# and the Winograd convolution's transforms (Conv2d.winograd), alone on CPUs with AVX2 but not AVX-512
CFLAGS = {"AVX512": ["-O3", "-shared", "-fPIC", "-fopenmp", "-mfma", "-mavx512f", "-mavx512bw", "-mavx512vl",
                     "-mavx512dq", "-mavx512bf16", "-mamx-tile", "-mamx-bf16"],
          "AVX2": ["-O3", "-shared", "-fPIC", "-fopenmp", "-mfma", "-mavx2"]}


def cpu_has(*features):
    """torch's CPU probes, torch.cpu._is_<feature>_supported, one answer per feature. They are private: absent
    means no."""
    return [getattr(torch.cpu, f"_is_{f}_supported", lambda: False)() for f in features]


@functools.cache
def native_kernel():
    """native.c compiled (by $CC, else cc) and loaded, or None where it cannot run: not Linux on a CPU with AVX2
    or AVX-512, or no native.c beside this file or no compiler that builds it (warned once). Its attention needs
    AVX-512 (`.attention`), its bf16 attention AMX too (`.amx`). The library is kept in ~/.cache/minisd under the
    hash of its source and flags, written whole or not at all."""
    flags = CFLAGS.get(torch.backends.cpu.get_cpu_capability())
    if platform.system() != "Linux" or not flags:
        return None
    source = Path(__file__).with_name("native.c")  # beside this file: a unet.py copied alone runs on SDPA
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "minisd"
    try:
        digest = hashlib.sha256(source.read_bytes() + " ".join(flags).encode()).hexdigest()[:16]
        lib = cache / f"native-{digest}.so"
        if not lib.exists():
            tmp = lib.with_name(f"{lib.name}.{os.getpid()}.tmp")
            cache.mkdir(parents=True, exist_ok=True)
            subprocess.run([os.environ.get("CC", "cc"), *flags, str(source), "-o", str(tmp)], check=True,
                           capture_output=True, text=True)
            os.replace(tmp, lib)
        kernel = ctypes.CDLL(str(lib))
    except (OSError, subprocess.CalledProcessError) as e:  # no native.c, no compiler, a failed build, read-only
        warnings.warn("native.c did not build: attention stays on SDPA, convolutions on oneDNN: "
                      f"{getattr(e, 'stderr', '') or e}")
        return None
    for f, pointers in ((kernel.winograd_input, 2), (kernel.winograd_output, 3)):
        f.argtypes = [ctypes.c_void_p] * pointers + [ctypes.c_int] * 4 + [ctypes.c_long] * 2 + [ctypes.c_int]
    kernel.winograd_filter.argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_int] * 3
    kernel.attention = hasattr(kernel, "attention_fp32")  # built for AVX-512
    if kernel.attention:
        for f in (kernel.attention_fp32, kernel.attention_bf16):
            f.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int] * 6
    kernel.amx = kernel.attention and all(cpu_has("amx_tile", "avx512_bf16")) and \
        kernel.attention_init() == 0  # and the OS allows it
    return kernel


def native_ready(bf16):
    """Is native.c's attention built and loaded here, with AMX for bf16."""
    kernel = native_kernel()
    return kernel is not None and kernel.attention and (not bf16 or kernel.amx)


def native_fits(q, k, v, heads, upcast):
    """May native.c take this call: fp32, or bf16 on AMX (an even head width), on the CPU; inference (no
    autograd). Under torch.compile the kernel is an operator of the graph (minisd::attention) that asks at run time
    whether it is built (else SDPA): tracing its loader would break the graph. Not in torch.export's graphs, whose
    programs run where native.c may not."""
    return q.device.type == "cpu" and not upcast and not torch.compiler.is_exporting() and \
        q.dtype in (torch.float32, torch.bfloat16) and q.dtype == k.dtype == v.dtype and k.shape == v.shape and \
        q.shape[0] == k.shape[0] and q.shape[-1] == k.shape[-1] and q.shape[-1] % heads == 0 and \
        (q.dtype == torch.float32 or (q.shape[-1] // heads) % 2 == 0) and \
        not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)) and \
        (torch.compiler.is_compiling() or native_ready(q.dtype == torch.bfloat16))


def native_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """native.c on (B, L, heads * d) tensors: fp32 to 2e-6 of float64, bf16 as close as SDPA's bf16 (2-4e-3);
    times in BENCHMARKS.md, "Our attention, native"."""
    if not native_ready(q.dtype == torch.bfloat16):  # compiled where the kernel does not build
        return attention(q, k, v, heads, "sdpa")
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    o = torch.empty_like(q)
    (B, Lq, D), Lk = q.shape, k.shape[1]
    lib = native_kernel()
    kernel = lib.attention_bf16 if q.dtype == torch.bfloat16 else lib.attention_fp32
    if kernel(q.data_ptr(), k.data_ptr(), v.data_ptr(), o.data_ptr(), B, heads, Lq, Lk, D // heads,
              torch.get_num_threads()):
        raise MemoryError("native.c could not allocate its packed keys and values")
    return o


# torch.compile sees native.c's attention as one operator of its graph, shaped like q, not as Python to trace
native_op = torch.library.custom_op("minisd::attention", native_attention, mutates_args=())
native_op.register_fake(lambda q, k, v, heads: torch.empty_like(q, memory_format=torch.contiguous_format))


def attention(q, k, v, heads, impl="auto", upcast=False):
    """Multi-head attention core. q: (B, Lq, D), k and v: (B, Lk, D) -> (B, Lq, D), with D = heads * d.

    impl "sdpa": torch's fused scaled_dot_product_attention (flash / memory-efficient kernels on CUDA,
    a tiled flash kernel on CPU). impl "tiled": our own O(N)-memory kernel above, readable and exact; "fused": the
    same kernel compiled (fused_attention); "native": native.c, fp32 on AVX-512 and bf16 on AMX (native_fits).
    "auto", the default: "native" where it fits, else "sdpa".
    upcast computes in fp32 (SD 2.x-768 needs it in fp16). Neither path builds the N x N matrix on CPU or
    CUDA; where SDPA falls back to its math kernel (other backends, exotic shapes), "tiled" still does not.
    """
    if impl == "auto":  # where native is the faster (BENCHMARKS.md): head widths up to 160, not the VAE's 512
        impl = "native" if q.shape[-1] // heads <= 160 and native_fits(q, k, v, heads, upcast) else "sdpa"
    elif impl == "native" and not native_fits(q, k, v, heads, upcast):
        raise ValueError("impl 'native' takes CPU inference in fp32 (AVX-512) or bf16 (AMX, an even head width)")
    if impl == "native":  # traced by torch.compile: its operator; else called straight (the operator costs 60 us)
        return (native_op if torch.compiler.is_compiling() else native_attention)(q, k, v, heads)
    B, Lq, D = q.shape
    dtype = q.dtype
    if upcast:
        q, k, v = q.float(), k.float(), v.float()
    q, k, v = (t.unflatten(-1, (heads, D // heads)).transpose(1, 2) for t in (q, k, v))  # (B, heads, L, d)
    if impl == "sdpa":
        o = F.scaled_dot_product_attention(q, k, v)
    elif impl == "tiled":
        o = tiled_attention(q, k, v)
    elif impl == "fused":
        o = fused_attention()(q, k, v)
    else:
        raise ValueError(f"unknown attention impl {impl!r}; use 'auto', 'sdpa', 'tiled', 'fused' or 'native'")
    return o.transpose(1, 2).reshape(B, Lq, D).to(dtype)

def randn(shape, generator, device, dtype):
    """N(0, I) drawn on the generator's device (the CPU for a seed or None) and then moved, so one seed gives the same
    numbers on any device; diffusers' randn_tensor does the same. The project's one seeded-noise helper."""
    where = generator.device if generator is not None else torch.device("cpu")
    return torch.randn(shape, generator=generator, device=where, dtype=dtype).to(device)


def fast_layout(t):
    """A tensor, or a model's weights, in the memory layout that is fastest where it lives: channels-last (NHWC) for
    bf16 on a CPU, where oneDNN's convolutions run NHWC (figures: BENCHMARKS.md, "Channels-last on the CPU").
    Anything else is left as it is: fp32 gains nothing from it there.
    The models call it on their input; loaders call it on the models."""
    p = t if isinstance(t, torch.Tensor) else next(t.parameters())
    fast = p.device.type == "cpu" and p.dtype == torch.bfloat16
    return t.to(memory_format=torch.channels_last) if fast else t

# -----------------------------------------------------------------------------
# oneDNN in CPU inference: convolutions with their weights prepacked, GEGLU fused into its matrix products

ONEDNN = platform.machine().lower() in ("x86_64", "amd64") and torch.backends.mkldnn.is_available()
# the dtypes its operators take here: bf16 and fp16 need AVX-512 (BW, VL, DQ) or AVX-NE-CONVERT; with AVX2 alone
# (AMD Zen 2 and 3, older Intel) they fail, and nn.Conv2d and nn.Linear take their own kernels
ONEDNN_DTYPES = {torch.float32} | {t for t, ok in ((torch.bfloat16, "_is_mkldnn_bf16_supported"),
                                                   (torch.float16, "_is_mkldnn_fp16_supported"))
                                   if ONEDNN and getattr(torch.ops.mkldnn, ok)()}
PREPACK = ONEDNN  # False: plain convolutions, no packed copy of their weights
WINOGRAD = True  # False: the fp32 3x3 convolutions on oneDNN too; saves 7/9 of their weights' size (Conv2d.winograd)
WINOGRAD_SCRATCH = 16 << 20  # bytes of transformed tiles a chunk: 2-64 MB measured alike in a step, one chunk 4% slower
WINOGRAD_MIN_TILES = 32  # 2x2 output blocks a call; fewer: products memory-bound (1280 channels, 16 blocks: 1.04-1.4x)


def onednn_inference(x, w, b=None):
    """May x meet weight w and bias b in oneDNN's own CPU operators: inference (no autograd, no autocast) on x86, in
    a dtype they take, not traced by torch.compile (asked first: tracing goes no further, so no graph break), which
    fuses on its own."""
    trains = w.requires_grad or x.requires_grad or b is not None and b.requires_grad
    return not torch.compiler.is_compiling() and ONEDNN and x.device.type == "cpu" and x.dtype == w.dtype and \
        x.dtype in ONEDNN_DTYPES and not (torch.is_grad_enabled() and trains) and \
        not torch.is_autocast_enabled("cpu")


# layer -> (key, packed weight, the weight it was made from), beside the layer: its state_dict, copies and .to() stay
# those of an nn.Conv2d
PACKED = weakref.WeakKeyDictionary()
# Optimizer steps per weight, counted by a hook on every optimizer: some write weights without bumping their version
# (fused AdamW on a CPU). Writes through .data bump nothing: after them, PACKED.clear().
STEPS = WeakIdKeyDictionary()


def count_steps(optimizer, args, kwargs):
    for group in optimizer.param_groups:
        for p in group["params"]:
            STEPS[p] = STEPS.get(p, 0) + 1


register_optimizer_step_post_hook(count_steps)


def kept(layer, key, w, make):
    """layer's kept copy of its weight w: make() once, and again when the key changed (a new shape, a version bumped
    by a write, an optimizer step on w) or w is another tensor (which may reuse a freed one's address)."""
    key += (w.data_ptr(), w._version, STEPS.get(w, 0))
    entry = PACKED.get(layer)
    if entry is None or entry[0] != key or entry[2]() is not w:
        PACKED[layer] = entry = (key, make(), weakref.ref(w))
    return entry[1]


class Conv2d(nn.Conv2d):
    """nn.Conv2d whose weight oneDNN gets already blocked in CPU inference. A plain CPU convolution reorders its
    weight into oneDNN's blocked layout at every call, a pass over all the weights at every step; this keeps the
    blocked copy, as torch.compile's freezing does: a bk-tiny step 4-10% faster in bf16 and fp32, for a copy of the
    convolution weights, 58-69% of a U-Net's (PREPACK = False saves it; BENCHMARKS.md, "Prepacked convolutions on
    the CPU"). The same oneDNN convolution: bf16 outputs are the same bits, fp32 ones differ by about 4e-6 relative.
    The fp32 3x3 convolutions (stride 1, padding 1, 32 blocks of 2x2 outputs or more) go by Winograd's algorithm
    instead, where native.c builds. prepack=False keeps that path alone, the others as nn.Conv2d's (vae.py: packing
    gained nothing in a decoder). A copy is made anew when its weight changes (kept()); a write through .data is not
    seen: unet.PACKED.clear() after one."""

    def __init__(self, *args, prepack=True, **kwargs):
        super().__init__(*args, **kwargs)
        self.prepack = prepack

    def forward(self, x):
        w = self.weight
        if not (onednn_inference(x, w, self.bias) and PREPACK) or w.is_inference() or x.dim() != 4 or \
                self.padding_mode != "zeros" or isinstance(self.padding, str):
            # torch.compile (which packs its own), autograd, autocast, GPUs, inference tensors (which track no
            # version), an unbatched image, other paddings: as usual
            return super().forward(x)
        args = (self.padding, self.stride, self.dilation, self.groups)
        if WINOGRAD and x.dtype == torch.float32 and w.shape[2:] == (3, 3) and args == ((1, 1), (1, 1), (1, 1), 1) \
                and native_kernel():
            tiles = x.shape[0] * ((x.shape[2] + 1) // 2) * ((x.shape[3] + 1) // 2)  # Winograd's 2x2 output blocks
            if tiles >= WINOGRAD_MIN_TILES:
                return self.winograd(x, tiles)
        if not self.prepack:
            return super().forward(x)
        packed = kept(self, (tuple(x.shape),), w,
                      lambda: torch.ops.mkldnn._reorder_convolution_weight(w, *args, x.shape))
        return torch.ops.mkldnn._convolution_pointwise(x, packed, self.bias, *args, "none", [], "")

    def winograd(self, x, tiles):
        """The fp32 3x3 convolution by Winograd's F(2x2, 3x3) (native.c): per 2x2 block of outputs, 16 multiplies
        for each input and output channel where the direct convolution does 36. Its 16 matrix products are
        torch.bmm's; native.c's transforms around them are adds. Over the input's `tiles` in chunks of at most
        WINOGRAD_SCRATCH bytes of products, so its scratch stays small. More exact than oneDNN's direct convolution:
        6-9e-7 of float64 at the U-Net's sizes (oneDNN's 2-4e-6). An fp32 U-Net step took 0.79-0.85 of its time on
        oneDNN (an AMD Zen 3, AVX2 alone: 0.92), for transformed filters 16/9 the size of the weights, kept where
        oneDNN's packed copy was (sd-v1: 3.7 GB for 2.1; BENCHMARKS.md, "Winograd convolutions in fp32")."""
        g = self.weight  # the filters
        lib, threads = native_kernel(), torch.get_num_threads()

        def transform():  # U = G g G^T (native.c), kept: (16, C_in, C_out)
            f, u = g.detach().contiguous(), torch.empty(16, g.shape[1], g.shape[0])  # f held while C reads it
            lib.winograd_filter(f.data_ptr(), u.data_ptr(), g.shape[1], g.shape[0], threads)
            return u
        u = kept(self, ("winograd",), g, transform)
        x = x.contiguous(memory_format=torch.channels_last)  # (N, H, W, C) in memory
        (n, c, h, w), c_out = x.shape, u.shape[2]
        y = torch.empty(n, c_out, h, w, memory_format=torch.channels_last)
        bias = None if self.bias is None else self.bias.data_ptr()
        chunk = max(64, WINOGRAD_SCRATCH // (16 * 4 * (c + c_out)))  # tiles whose transforms fit the scratch
        for p in range(0, tiles, chunk):
            k = min(chunk, tiles - p)
            v = torch.empty(16, k, c)
            if lib.winograd_input(x.data_ptr(), v.data_ptr(), n, h, w, c, p, k, threads):  # V = B^T d B
                raise MemoryError("native.c could not allocate its scratch")
            m = torch.bmm(v, u)  # M_q = V_q U_q, q = 1 ... 16
            lib.winograd_output(m.data_ptr(), bias, y.data_ptr(), n, h, w, c_out, p, k, threads)  # Y = A^T M A + b
        return y

    def _apply(self, fn, *args, **kwargs):  # .to(), .cuda(), .half(): the copy is stale; free it now
        PACKED.pop(self, None)
        return super()._apply(fn, *args, **kwargs)

# -----------------------------------------------------------------------------
# Memory on the CPU: glibc's allocator, kept from unmapping what the next step asks for again

LIBC = ctypes.CDLL(None) if platform.libc_ver()[0] == "glibc" else None  # the C library, where it is glibc


def keep_freed_memory():
    """Ask glibc to keep the memory a tensor frees for the next one, not hand it back to the kernel. By default a
    block over 32 MB gets its own mapping, unmapped when freed, and the heap returns its free top beyond 64 MB, so
    the next tensor faults its pages in again, zeroed by the kernel: 43-60 thousand page faults per bf16 bk-tiny
    step on the CPU, 0.75 million per fp32 training step. Without them the step took 0.93 of its time (median), the
    training step 0.59. The cost: freed blocks that the next one does not fit stay in the heap, up to +0.7 GB at
    1024 px (BENCHMARKS.md, "Page faults on the CPU").
    It changes the whole process, so the command lines call it and a library user opts in. Only where glibc is."""
    if LIBC:
        LIBC.mallopt(-3, 256 << 20)  # M_MMAP_THRESHOLD: a block under 256 MB comes from the heap, not its own mapping
        LIBC.mallopt(-1, 2 ** 31 - 1)  # M_TRIM_THRESHOLD: keep the heap's free top instead of returning it


def release_freed_memory():
    """Hand the heap's free pages back to the kernel: between stages whose tensors differ in size (the U-Net's and
    the VAE decoder's), or the first stage's holes add to the next one's peak (+0.3 GB at 512 px without this)."""
    if LIBC:
        LIBC.malloc_trim(0)

# -----------------------------------------------------------------------------
# Config


# the UNetConfig fields that a diffusers config.json names and means alike
SHARED_FIELDS = ("in_channels", "out_channels", "cross_attention_dim", "norm_num_groups", "norm_eps", "flip_sin_to_cos",
                 "freq_shift", "use_linear_projection", "upcast_attention", "sample_size")


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 4                                  # SD v1 latents have 4 channels
    out_channels: int = 4
    block_out_channels: tuple = (320, 640, 1280, 1280)    # one entry per stage; BK-Tiny drops the last
    layers_per_block: tuple = (2, 2, 2, 2)                # (resnet, attention) pairs per down stage; BK: 1. The up
                                                          # stage has one more: it also eats the stage input's skip
    cross_attn: tuple = (True, True, True, False)         # does the stage have transformer blocks
    mid_block: bool = True                                # BK-Small and BK-Tiny remove it
    num_heads: tuple = (8, 8, 8, 8)                       # heads per stage (SD v1 configs: `attention_head_dim`)
    cross_attention_dim: int = 768                        # width of the text states: CLIP ViT-L/14 for SD v1
    norm_num_groups: int = 32
    norm_eps: float = 1e-5                                # resnet GroupNorms; transformer GroupNorm uses 1e-6
    flip_sin_to_cos: bool = True                          # the timestep embedding is [cos, sin], as LDM trained it
    freq_shift: int = 0
    use_linear_projection: bool = False                   # SD 2.x: proj_in/proj_out are Linear, not 1x1 conv
    upcast_attention: bool = False                        # SD 2.x-768: attention in fp32
    sample_size: int = 64                                 # the latent side used in training (512 px / 8)
    attention: str = "auto"                               # attention(): "auto", "sdpa", "tiled", "fused", "native"

    def __post_init__(self):
        n = len(self.block_out_channels)
        for name in ("layers_per_block", "cross_attn", "num_heads"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name} needs one entry per stage ({n}), got {getattr(self, name)}")

    @classmethod
    def from_diffusers(cls, d):
        """Read a diffusers `unet/config.json` dict (SD v1/v2 and the BK-SDM releases)."""
        defaults = dict(center_input_sample=False, only_cross_attention=False, dual_cross_attention=False,
                        class_embed_type=None, addition_embed_type=None, encoder_hid_dim=None,
                        time_cond_proj_dim=None, transformer_layers_per_block=1, resnet_time_scale_shift="default",
                        time_embedding_type="positional", time_embedding_dim=None, act_fn="silu",
                        downsample_padding=1, mid_block_scale_factor=1, resnet_out_scale_factor=1.0,
                        conv_in_kernel=3, conv_out_kernel=3, attention_type="default", dropout=0.0,
                        num_class_embeds=None, time_embedding_act_fn=None, timestep_post_act=None,
                        resnet_skip_time_act=False, cross_attention_norm=None, class_embeddings_concat=False)
        odd = {k: d[k] for k, v in defaults.items() if k in d and d[k] != v}
        if odd:
            raise ValueError(f"unsupported U-Net config values (not Stable Diffusion v1/v2): {odd}")
        down = d.get("down_block_types", ())
        mid = d.get("mid_block_type", "UNetMidBlock2DCrossAttn")  # a missing key means the default mid-block
        if mid not in (None, "UNetMidBlock2DCrossAttn"):
            raise ValueError(f"unsupported mid_block_type {mid!r}")
        per_stage = lambda v: tuple(v) if isinstance(v, (list, tuple)) else (v,) * len(down)
        heads = d.get("num_attention_heads") or d.get("attention_head_dim", 8)  # diffusers' naming quirk
        return cls(block_out_channels=tuple(d["block_out_channels"]),
                   layers_per_block=per_stage(d.get("layers_per_block", 2)),
                   cross_attn=tuple(t.startswith("CrossAttn") for t in down), mid_block=mid is not None,
                   num_heads=per_stage(heads), **{k: d[k] for k in SHARED_FIELDS if k in d})

    def to_diffusers(self):
        """The diffusers `UNet2DConditionModel` config for this architecture (for export and tests). Uniform
        per-stage values are written as one int, as the official config.json files have them (diffusers'
        single-file converter does arithmetic on `layers_per_block`)."""
        one = lambda v: v[0] if len(set(v)) == 1 else list(v)
        return dict(_class_name="UNet2DConditionModel", block_out_channels=list(self.block_out_channels),
                    layers_per_block=one(self.layers_per_block),
                    down_block_types=["CrossAttnDownBlock2D" if c else "DownBlock2D" for c in self.cross_attn],
                    up_block_types=["CrossAttnUpBlock2D" if c else "UpBlock2D" for c in self.cross_attn[::-1]],
                    mid_block_type="UNetMidBlock2DCrossAttn" if self.mid_block else None,
                    attention_head_dim=one(self.num_heads), **{k: getattr(self, k) for k in SHARED_FIELDS})


SD_V1 = UNetConfig()
BK_BASE = replace(SD_V1, layers_per_block=(1, 1, 1, 1))
BK_SMALL = replace(BK_BASE, mid_block=False)
PRESETS = {
    "sd-v1": SD_V1,        # 859.5M parameters
    "bk-base": BK_BASE,    # 579.4M: the 2nd pair of every down stage and the middle pair of every up stage gone
    "bk-small": BK_SMALL,  # 482.3M: base without the mid-block
    "bk-tiny": replace(BK_SMALL, block_out_channels=(320, 640, 1280), layers_per_block=(1, 1, 1),
                       cross_attn=(True, True, True), num_heads=(8, 8, 8)),  # 323.4M: no innermost stage
    # sd-v1's topology at toy width (3.2M parameters) for fast tests and offline smoke runs
    "tiny-test": replace(SD_V1, block_out_channels=(32, 64, 64, 64), cross_attention_dim=32,
                         norm_num_groups=16, num_heads=(2, 2, 4, 4)),
    # toy.py's teacher: the same at an 8x8 latent (64 px images), reading a 64-wide text encoder
    "toy": replace(SD_V1, block_out_channels=(32, 64, 64, 64), cross_attention_dim=64, norm_num_groups=16,
                   num_heads=(2, 2, 4, 4), sample_size=8),
}

# -----------------------------------------------------------------------------
# Building blocks (bottom-up), each mirroring the diffusers class it names


def run(module, *args, ckpt=False):
    """Call module(*args), recomputing its activations in backward when gradient checkpointing is on."""
    if ckpt and torch.is_grad_enabled():
        return checkpoint(module, *args, use_reentrant=False)
    return module(*args)


def timestep_embedding(t, dim, flip_sin_to_cos=True, freq_shift=0):
    """Sinusoidal embedding of t (DDPM / Transformer): frequencies 10000^(-i/(dim/2 - freq_shift))."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - freq_shift))
    angles = t[:, None].float() * freqs[None]
    emb = torch.cat([angles.sin(), angles.cos()], dim=-1)
    return torch.cat([emb[:, half:], emb[:, :half]], dim=-1) if flip_sin_to_cos else emb


class TimestepEmbedding(nn.Module):
    """Mirrors diffusers `TimestepEmbedding` (LDM: `time_embed`)."""

    def __init__(self, c_in, c_out):
        super().__init__()
        self.linear_1 = nn.Linear(c_in, c_out)
        self.linear_2 = nn.Linear(c_out, c_out)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


def tile(x, n):
    """x repeated along the batch to n rows, as torch.cat([x] * k): a latent meets its k texts (UNet.forward)."""
    return x if x.shape[0] == n else torch.cat([x] * (n // x.shape[0]))  # cat keeps NHWC (repeat would not)


class ResnetBlock2D(nn.Module):
    """Mirrors diffusers `ResnetBlock2D` (LDM: `ResBlock`): two 3x3 convs with the timestep added between."""

    def __init__(self, c_in, c_out, temb_dim, groups, eps):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in, eps=eps)
        self.conv1 = Conv2d(c_in, c_out, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_dim, c_out)
        self.norm2 = nn.GroupNorm(groups, c_out, eps=eps)
        self.conv2 = Conv2d(c_out, c_out, 3, padding=1)
        # a 1x1 conv matches channels on the residual path when they change
        self.conv_shortcut = Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x, temb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + tile(self.time_emb_proj(F.silu(temb)), h.shape[0])[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))  # (dropout 0 in SD: omitted)
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class Attention(nn.Module):
    """Mirrors diffusers `Attention` (LDM: `CrossAttention`): self-attention, or cross-attention to `context`."""

    def __init__(self, dim, heads, context_dim=None, impl="auto", upcast=False):
        super().__init__()
        self.heads, self.impl, self.upcast = heads, impl, upcast
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Dropout(0.0)])  # index 1 is Dropout: kept so keys match

    def forward(self, x, context=None):
        # three matmuls, not one fused QKV: fusing measured no faster on CPU (BENCHMARKS.md, bench.py --qkv)
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        return self.to_out[0](attention(q, k, v, self.heads, self.impl, self.upcast))


class GEGLU(nn.Module):
    """Mirrors diffusers `GEGLU`: a gated GELU unit (Shazeer 2020), value * GELU(gate). In CPU inference the two
    halves of proj are two oneDNN matrix products that apply the GELU and the product to their outputs as they
    write them, where the plain unit makes two more passes over its hidden activations: a bf16 bk-tiny step in
    0.91-0.95 of the plain one's time. fp32 within 1e-6 of the plain unit; bf16 rounds once, not three times
    (BENCHMARKS.md, "GEGLU fused on oneDNN")."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * hidden)

    def forward(self, x):
        w, b, h = self.proj.weight, self.proj.bias, self.proj.out_features // 2
        if onednn_inference(x, w, b):  # GELU and the product ride on oneDNN's matrix products, no pass of their own:
            gate = torch.ops.mkldnn._linear_pointwise(x, w[h:], b[h:], "gelu", [], "none")  # erf GELU, as F.gelu
            return torch.ops.mkldnn._linear_pointwise.binary(x, gate, w[:h], b[:h], "mul")  # value * GELU(gate)
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class BasicTransformerBlock(nn.Module):
    """Mirrors diffusers `BasicTransformerBlock`: self-attention, cross-attention to the text, GEGLU MLP."""

    def __init__(self, dim, heads, context_dim, impl, upcast):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, None, impl, upcast)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, context_dim, impl, upcast)
        self.norm3 = nn.LayerNorm(dim)
        # index 1 is Dropout: kept so the keys are ff.net.0.proj and ff.net.2 as in the checkpoints
        self.ff = nn.Module()
        self.ff.net = nn.ModuleList([GEGLU(dim, 4 * dim), nn.Dropout(0.0), nn.Linear(4 * dim, dim)])

    def forward(self, x, context):
        # new term first, as diffusers adds: the sum takes its contiguous layout, not that of x, which enters as a
        # transposed view of the image; adds on contiguous tensors run vectorized on GPUs (BENCHMARKS.md)
        x = tile(self.attn1(self.norm1(x)) + x, context.shape[0])  # the text enters next: k copies (UNet.forward)
        x = self.attn2(self.norm2(x), context) + x
        return self.ff.net[2](self.ff.net[0](self.norm3(x))) + x


class Transformer2DModel(nn.Module):
    """Mirrors diffusers `Transformer2DModel` (LDM: `SpatialTransformer`): image -> tokens -> block -> image."""

    def __init__(self, c, heads, cfg):
        super().__init__()
        # eps 1e-6 here (vs 1e-5 in the resnets): what LDM's SpatialTransformer used
        self.norm = nn.GroupNorm(cfg.norm_num_groups, c, eps=1e-6)
        proj = (lambda: nn.Linear(c, c)) if cfg.use_linear_projection else (lambda: Conv2d(c, c, 1))
        self.proj_in = proj()
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(c, heads, cfg.cross_attention_dim, cfg.attention, cfg.upcast_attention)])
        self.proj_out = proj()
        self.linear = cfg.use_linear_projection

    def forward(self, x, context):
        B, C, H, W = x.shape
        h = self.norm(x)
        if self.linear:  # SD 2.x: Linear projections on the tokens
            h = self.proj_in(h.permute(0, 2, 3, 1).reshape(B, H * W, C))  # (B, L, C) tokens
        else:  # SD v1: 1x1 convs on the image
            h = self.proj_in(h).permute(0, 2, 3, 1).reshape(B, H * W, C)
        for block in self.transformer_blocks:
            h = block(h, context)
        if self.linear:
            h = self.proj_out(h).reshape(-1, H, W, C).permute(0, 3, 1, 2)  # back to (k*B, C, H, W)
        else:  # the tokens as an NHWC view of the image: kept so if x is NHWC (bf16 on a CPU), else made NCHW as
            h = h.reshape(-1, H, W, C).permute(0, 3, 1, 2)  # diffusers does (BENCHMARKS.md: the copy pair this saves)
            h = self.proj_out(h if x.is_contiguous(memory_format=torch.channels_last) else h.contiguous())
        return tile(x, h.shape[0]) + h


class Downsample2D(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = Conv2d(c, c, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)


class Upsample2D(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class DownBlock(nn.Module):
    """One encoder stage. Mirrors diffusers `CrossAttnDownBlock2D` (or `DownBlock2D` without attention).
    Returns the stage output and the skips it produced (one per pair, one after the downsampler)."""

    def __init__(self, c_in, c_out, n, attn, heads, down, temb_dim, cfg):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock2D(c_in if i == 0 else c_out, c_out, temb_dim, cfg.norm_num_groups, cfg.norm_eps)
             for i in range(n)])
        self.attentions = nn.ModuleList([Transformer2DModel(c_out, heads, cfg) for _ in range(n)] if attn else [])
        self.downsamplers = nn.ModuleList([Downsample2D(c_out)] if down else [])

    def forward(self, h, temb, context, ckpt=False):
        skips = []
        for i, resnet in enumerate(self.resnets):
            h = run(resnet, h, temb, ckpt=ckpt)
            if self.attentions:
                h = run(self.attentions[i], h, context, ckpt=ckpt)
            skips.append(h)
        for down in self.downsamplers:
            h = down(h)
            skips.append(h)
        return h, skips


class UpBlock(nn.Module):
    """One decoder stage. Mirrors diffusers `CrossAttnUpBlock2D` (or `UpBlock2D`). Each resnet first
    concatenates the newest skip on channels; the last one takes the skip from the stage's input."""

    def __init__(self, c_prev, c_out, c_skip_in, n, attn, heads, up, temb_dim, cfg):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock2D((c_prev if i == 0 else c_out) + (c_skip_in if i == n - 1 else c_out), c_out,
                           temb_dim, cfg.norm_num_groups, cfg.norm_eps) for i in range(n)])
        self.attentions = nn.ModuleList([Transformer2DModel(c_out, heads, cfg) for _ in range(n)] if attn else [])
        self.upsamplers = nn.ModuleList([Upsample2D(c_out)] if up else [])

    def forward(self, h, skips, temb, context, ckpt=False):
        for i, resnet in enumerate(self.resnets):
            h = run(resnet, torch.cat([h, tile(skips.pop(), h.shape[0])], dim=1), temb, ckpt=ckpt)
            if self.attentions:
                h = run(self.attentions[i], h, context, ckpt=ckpt)
        for up in self.upsamplers:
            h = up(h)
        return h


class MidBlock(nn.Module):
    """Mirrors diffusers `UNetMidBlock2DCrossAttn`: resnet, attention, resnet at the lowest resolution."""

    def __init__(self, c, heads, temb_dim, cfg):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(c, c, temb_dim, cfg.norm_num_groups, cfg.norm_eps)
                                      for _ in range(2)])
        self.attentions = nn.ModuleList([Transformer2DModel(c, heads, cfg)])

    def forward(self, h, temb, context, ckpt=False):
        h = run(self.resnets[0], h, temb, ckpt=ckpt)
        h = run(self.attentions[0], h, context, ckpt=ckpt)
        return run(self.resnets[1], h, temb, ckpt=ckpt)

# -----------------------------------------------------------------------------
# The model


class UNet(nn.Module):
    """eps_theta(x_t, t, context). Mirrors diffusers `UNet2DConditionModel` for SD v1/v2 and BK-SDM.
    Cast to bf16, its output is within 1.1-1.5e-2 of fp32's, normwise (||d|| / ||ref||, the four presets at 64x64,
    batch 2, 20 inputs each), and its largest element's error 1.5-2.1e-2: bf16's own rounding, as in diffusers' bf16
    (BENCHMARKS.md, "Our attention, native"; `python bench.py --dtype bfloat16 --fidelity 20`)."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        self.gradient_checkpointing = False  # distill.py turns it on to trade compute for memory
        ch, n = cfg.block_out_channels, len(cfg.block_out_channels)
        temb_dim = 4 * ch[0]  # 1280 for SD v1
        self.conv_in = Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(ch[0], temb_dim)
        self.down_blocks = nn.ModuleList(
            [DownBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block[i], cfg.cross_attn[i], cfg.num_heads[i],
                       i < n - 1, temb_dim, cfg) for i in range(n)])
        self.mid_block = MidBlock(ch[-1], cfg.num_heads[-1], temb_dim, cfg) if cfg.mid_block else None
        # up stage j mirrors down stage i = n-1-j and has one more pair than it
        self.up_blocks = nn.ModuleList(
            [UpBlock(ch[min(i + 1, n - 1)], ch[i], ch[max(i - 1, 0)], cfg.layers_per_block[i] + 1,
                     cfg.cross_attn[i], cfg.num_heads[i], i > 0, temb_dim, cfg) for i in reversed(range(n))])
        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, ch[0], eps=cfg.norm_eps)
        self.conv_out = Conv2d(ch[0], cfg.out_channels, 3, padding=1)

    def check_inputs(self, x, t, context):
        cfg, f = self.cfg, 2 ** (len(self.cfg.block_out_channels) - 1)
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"latent must be (B, {cfg.in_channels}, H, W), got {tuple(x.shape)}")
        if x.shape[2] % f or x.shape[3] % f:
            raise ValueError(f"latent size {tuple(x.shape[2:])} must be divisible by {f}: this U-Net halves it "
                             f"{len(cfg.block_out_channels) - 1} times (image sides divisible by {8 * f})")
        if context.ndim != 3 or context.shape[0] % x.shape[0] or context.shape[-1] != cfg.cross_attention_dim:
            raise ValueError(f"context must be (k * {x.shape[0]}, tokens, {cfg.cross_attention_dim}): k texts per "
                             f"latent, got {tuple(context.shape)}")
        if t.ndim > 1 or t.numel() not in (1, x.shape[0]):
            raise ValueError(f"t must be a number or hold one timestep per sample, got shape {tuple(t.shape)}")

    def forward(self, x, t, context):
        """x: (B, 4, H, W) noisy latent, t: number or (B,) timesteps, context: (k*B, 77, 768) text -> eps (k*B, ...).

        k > 1 gives each latent k texts, as if x were torch.cat([x] * k): classifier-free guidance's pair (k = 2, the
        unconditional and the conditional text) for one latent. The layers before the first cross-attention see
        only x and t, so they run once, and their output goes on as k copies (`tile`): the repeated latent's eps
        within 4e-6 in fp32, a guided bk-tiny step in 0.93 of its time (BENCHMARKS.md, "The guided pair")."""
        t = torch.as_tensor(t, device=x.device)
        self.check_inputs(x, t, context)
        ckpt = self.gradient_checkpointing and self.training
        temb = timestep_embedding(t.reshape(-1).expand(x.shape[0]), self.cfg.block_out_channels[0],
                                  self.cfg.flip_sin_to_cos, self.cfg.freq_shift).to(x.dtype)
        temb = self.time_embedding(temb)
        x = fast_layout(x)
        if x.is_contiguous(memory_format=torch.channels_last) and not self.conv_in.weight.is_inference() and \
                not self.conv_in.weight.is_contiguous(memory_format=torch.channels_last):
            with torch.inference_mode(False):  # ordinary weights even here: they track versions (Conv2d)
                fast_layout(self)  # once: a model built and cast by hand gets the loaders' NHWC weights too
        h = self.conv_in(x)
        skips = [h]  # the skip stack starts with conv_in's output; up resnets pop from its end
        for block in self.down_blocks:
            h, s = block(h, temb, context, ckpt)
            skips += s
        if self.mid_block is not None:
            h = self.mid_block(h, temb, context, ckpt)
        for block in self.up_blocks:
            h = block(h, skips, temb, context, ckpt)
        out = self.conv_out(F.silu(self.conv_norm_out(h))).contiguous()  # the caller's layout back
        return tile(out, context.shape[0])  # k copies even if no layer took the text

# -----------------------------------------------------------------------------
# Architecture summary: blocks, removals, parameters and MACs (counted the paper's way, like thop)


def count_macs(model, latent=64, batch=1):
    """MACs of one forward pass per top-level block, in the paper's convention: convolutions and linear layers (what
    thop counts), with the attention matmuls q k^T and p v counted apart (thop skips them). Runs a twin of the model on
    the meta device: no memory, no time. Returns {block: [conv and linear MACs, attention matmul MACs]}."""
    with torch.device("meta"):  # hooks see only shapes
        meta = UNet(model.cfg)
    macs = {}

    def count(block, m, inp, out):
        if isinstance(m, Attention):  # q k^T and p v: 2 * B * Lq * Lk * D
            x, ctx = inp[0], (inp[1] if len(inp) > 1 else inp[0])
            macs[block][1] += 2 * x.shape[0] * x.shape[1] * ctx.shape[1] * x.shape[2]
        else:  # each output element of a conv or linear layer costs one MAC per input it reads
            k = m.in_channels // m.groups * math.prod(m.kernel_size) if isinstance(m, nn.Conv2d) else m.in_features
            macs[block][0] += out.numel() * k

    for name, child in meta.named_children():
        stages = isinstance(child, nn.ModuleList)  # down_blocks.0, down_blocks.1, ...: one row each
        for block, module in [(f"{name}.{i}", b) for i, b in enumerate(child)] if stages else [(name, child)]:
            macs[block] = [0, 0]
            for m in module.modules():
                if isinstance(m, (nn.Conv2d, nn.Linear, Attention)):
                    m.register_forward_hook(functools.partial(count, block))
    x = torch.zeros(batch, model.cfg.in_channels, latent, latent, device="meta")
    ctx = torch.zeros(batch, 77, model.cfg.cross_attention_dim, device="meta")
    with torch.no_grad():
        meta(x, torch.zeros(batch, device="meta"), ctx)
    return macs


def summary(cfg, latent=64, ref=PRESETS["sd-v1"]):
    """A table of the blocks: resolution, channels, (resnet, attention) pairs kept vs the reference, parameters and
    MACs; then the totals against the reference."""
    with torch.device("meta"):
        model, ref_model = UNet(cfg), UNet(ref)
    macs, ref_macs = count_macs(model, latent), count_macs(ref_model, latent)
    params = lambda m: sum(p.numel() for p in m.parameters())
    n, nref = len(cfg.block_out_channels), len(ref.block_out_channels)
    rows = [("block", "res", "ch", "pairs (vs ref)", "params", "GMACs", "attn GMACs")]
    for name, (mc, ma) in macs.items():
        kind, _, j = name.partition(".")
        i = int(j) if kind == "down_blocks" else n - 1 - int(j) if kind == "up_blocks" else 0  # the stage
        pairs, res, ch = "", latent >> (n - 1 if kind == "mid_block" else i), cfg.block_out_channels[i]
        if kind in ("down_blocks", "up_blocks"):
            up = kind == "up_blocks"  # an up stage has one pair more than its down stage
            kept, had = cfg.layers_per_block[i] + up, (ref.layers_per_block[i] + up if i < nref else 0)
            pairs = f"{kept}{'A' if cfg.cross_attn[i] else 'R'}" + (f" (-{had - kept})" if had > kept else "")
        rows.append((name, res, ch, pairs, f"{params(model.get_submodule(name)) / 1e6:.2f}M", f"{mc / 1e9:.2f}",
                     f"{ma / 1e9:.2f}"))
    if ref.mid_block and not cfg.mid_block:
        rows.append(("mid_block", latent >> (n - 1), "", "removed", "0", "0", "0"))
    for i in range(n, nref):
        rows.append((f"stage {i}", latent >> i, ref.block_out_channels[i], "removed (down and up)", "0", "0", "0"))
    widths = [max(len(str(r[c])) for r in rows) for c in range(len(rows[0]))]
    lines = ["  ".join(str(v).ljust(w) for v, w in zip(r, widths)) for r in rows]
    total, ref_total = params(model), params(ref_model)
    conv_lin, attn_mm = sum(v[0] for v in macs.values()), sum(v[1] for v in macs.values())
    ref_conv_lin = sum(v[0] for v in ref_macs.values())
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:],
                      f"total: {total:,} parameters ({100 * (total / ref_total - 1):+.1f}% vs reference), "
                      f"{conv_lin / 1e9:.1f}G MACs per step at a {latent}x{latent} latent, batch 1 "
                      f"({100 * (conv_lin / ref_conv_lin - 1):+.1f}%), + {attn_mm / 1e9:.1f}G in attention matmuls"])

# -----------------------------------------------------------------------------
# Command line:  python unet.py --preset bk-small --summary


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--preset", default="bk-small", choices=list(PRESETS))
    ap.add_argument("--summary", action="store_true", help="print the block table and exit")
    ap.add_argument("--latent", type=int, default=64, help="latent side (image side / 8)")
    args = ap.parse_args()
    cfg = PRESETS[args.preset]
    if args.summary:
        print(f"U-Net {args.preset} vs sd-v1 (pairs: R = resnet only, A = resnet + attention)")
        print(summary(cfg, args.latent))
    else:
        print(f"*** SMOKE RUN: {args.preset} U-Net with RANDOM weights; the output is noise, not a model ***")
        torch.manual_seed(0)
        x = torch.randn(1, cfg.in_channels, args.latent, args.latent)
        ctx = torch.randn(1, 77, cfg.cross_attention_dim)
        with torch.no_grad():
            eps = UNet(cfg).eval()(x, 999, ctx)
        print(f"eps {tuple(eps.shape)}, mean {eps.mean():.4f}, std {eps.std():.4f}")
