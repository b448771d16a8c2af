"""
Text-to-image and image-to-image with Stable Diffusion v1 / BK-SDM: the samplers (PNDM, DDIM, DPM-Solver++(2M),
Euler, Euler ancestral) and the two pipelines, numerically identical to diffusers' StableDiffusionPipeline and
StableDiffusionImg2ImgPipeline given the same weights and noise (the sampler tests in test_all.py).

References
1) Liu et al., "Pseudo Numerical Methods for Diffusion Models on Manifolds" (PNDM), arXiv 2202.09778:
   the transfer step eq. (9) and the pseudo linear multi-step (PLMS) method, eqs. (12)-(13), Algorithm 2.
2) Song et al., "Denoising Diffusion Implicit Models", arXiv 2010.02502: eqs. (12) and (16).
3) Lu et al., "DPM-Solver++", arXiv 2211.01095: the data-prediction solver, Algorithm 2 (multistep 2M).
4) Karras et al., "Elucidating the Design Space of Diffusion-Based Generative Models", arXiv 2206.00364:
   the ODE dx/dsigma = (x - D(x; sigma)) / sigma and its Euler step (Algorithm 1 without the 2nd-order correction);
   the ancestral variant splits each step into sigma_down and fresh noise sigma_up (k-diffusion, K. Crowson).
5) Ho et al., "Denoising Diffusion Probabilistic Models", arXiv 2006.11239: q(x_t | x_0), eq. (4).
6) Numerical reference: diffusers 0.42 schedulers (scheduling_pndm.py, scheduling_ddim.py,
   scheduling_dpmsolver_multistep.py, scheduling_euler_discrete.py, scheduling_euler_ancestral_discrete.py) and
   pipelines/stable_diffusion/pipeline_stable_diffusion{,_img2img}.py.
Notation: alpha_bar_t = prod(1 - beta) (diffusers' alphas_cumprod); sigma = sqrt((1 - alpha_bar) / alpha_bar) is the
same noise level in the "variance exploding" form Karras and DPM-Solver use, x_VE = x_VP / sqrt(alpha_bar).
Extension point: a new sampler is one class with set_timesteps / step (and add_noise for img2img).
"""
import argparse
import json
import math
import os
import re
import sys
import tempfile
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from PIL.PngImagePlugin import PngInfo
from tqdm import tqdm

import clip_text
import convert_weights as cw
import unet
import vae
from unet import randn

# -----------------------------------------------------------------------------
# Config: the SD v1 noise schedule, as its scheduler/scheduler_config.json ships it


@dataclass(frozen=True)
class SamplerConfig:
    num_train_timesteps: int = 1000       # the DDPM chain SD was trained on
    beta_start: float = 0.00085           # LDM's schedule; "scaled_linear" = linear in sqrt(beta), then squared
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    steps_offset: int = 1                 # "leading" steps are 1, 41, ... not 0, 40, ...: the last step still sees
                                          # a little noise (t=1), as in the original LDM (ddim_discretize="uniform")
    set_alpha_to_one: bool = False        # the step past t=0 uses alpha_bar_0 (0.99915), not 1, as LDM's DDIM does
    clip_sample: bool = False             # DDIM: no clamp of the predicted x_0 (latents are not in [-1, 1])
    prediction_type: str = "epsilon"      # the U-Net predicts the noise
    # None: each sampler's own diffusers default ("leading" for PNDM/DDIM, "linspace" for DPM-Solver/Euler). SD v1's
    # config file predates this key, and diffusers' from_config() does not carry a filled-in default to another
    # scheduler, so this is what a diffusers user who switches schedulers gets.
    timestep_spacing: str | None = None

    @classmethod
    def from_diffusers(cls, d):
        """From a diffusers scheduler_config dict (unknown keys ignored). Keys diffusers lists in _use_default_values
        were filled in by it, not read from the file, and from_config() drops them: so do we."""
        d = {f.name: d[f.name] for f in fields(cls) if f.name in d and f.name not in d.get("_use_default_values", ())}
        if d.get("prediction_type", "epsilon") != "epsilon" or d.get("beta_schedule") not in (None, "linear",
                                                                                               "scaled_linear"):
            raise ValueError(f"unsupported scheduler config {d}: SD v1 uses epsilon prediction, (scaled_)linear betas")
        return cls(**d)


SD_V1 = SamplerConfig()


def alphas_cumprod(cfg):
    """alpha_bar_t for t = 0..999, fp32 on the CPU as diffusers computes it (parity down to the last bit)."""
    N = cfg.num_train_timesteps
    if cfg.beta_schedule == "scaled_linear":
        betas = torch.linspace(cfg.beta_start ** 0.5, cfg.beta_end ** 0.5, N, dtype=torch.float32) ** 2
    else:
        betas = torch.linspace(cfg.beta_start, cfg.beta_end, N, dtype=torch.float32)
    return torch.cumprod(1.0 - betas, dim=0)


# -----------------------------------------------------------------------------
# Samplers. Interface: set_timesteps(n); then per t in .timesteps: eps = unet(scale_model_input(x, t), t, ...),
# x = step(eps, t, x, generator). x starts as noise * init_noise_sigma (txt2img) or add_noise(x0, noise, t) (img2img).


class Sampler:
    """The common part: the schedule alpha_bar_t, argument checks, the img2img start, DDPM's forward process."""
    spacings = ("leading",)  # the timestep_spacing values a sampler implements; the first is its default
    init_noise_sigma = 1.0

    def __init__(self, cfg=SD_V1):
        self.cfg, self.N = cfg, cfg.num_train_timesteps
        self.alphas_cumprod = alphas_cumprod(cfg)
        self.final_alpha_cumprod = torch.tensor(1.0) if cfg.set_alpha_to_one else self.alphas_cumprod[0]
        self.spacing = cfg.timestep_spacing or self.spacings[0]
        if self.spacing not in self.spacings:
            raise ValueError(f"{type(self).__name__} supports timestep_spacing {self.spacings}, got {self.spacing!r}")
        self.timesteps, self.index = None, 0

    def check_steps(self, n):
        if not isinstance(n, int) or not 1 <= n <= self.N:
            raise ValueError(f"steps must be an integer in 1..{self.N}, got {n!r}")

    def leading(self, k, bounded=True):
        """diffusers' "leading" spacing, ascending: k timesteps N // k apart from steps_offset up. Too many steps
        put the last one past the schedule (1, 2, ... 1000 for k = 1000), where diffusers fails on an index (PNDM,
        DDIM) or gives NaN (DPM-Solver); bounded=False: Euler's sigmas clamp there, in diffusers as in sigmas_at."""
        t = np.arange(k) * (self.N // k) + self.cfg.steps_offset
        if self.N // k == 0 or bounded and t[-1] >= self.N:
            raise ValueError(f"too many steps for 'leading' timesteps with steps_offset {self.cfg.steps_offset}: one "
                             f"would be t = {t[-1]}, past the schedule's last, {self.N - 1}")
        return t

    def start_at(self, i):
        """img2img: begin at the i-th timestep (diffusers' set_begin_index); returns the timesteps left."""
        self.index = i
        return self.timesteps[i:]

    def scale_model_input(self, x, t):
        return x

    def add_noise(self, x0, noise, t):
        # q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I), DDPM eq. (4); t holds one step per sample
        a = self.alphas_cumprod.to(x0.device, x0.dtype)[t.to(x0.device)].view(-1, 1, 1, 1)
        return a ** 0.5 * x0 + (1 - a) ** 0.5 * noise


class PNDM(Sampler):
    """PLMS as SD v1 ships it (skip_prk_steps): 4th-order Adams-Bashforth on eps, warmed up with lower orders.
    Mirrors diffusers `PNDMScheduler` (step_plms)."""

    def set_timesteps(self, n):
        self.check_steps(n)
        self.ratio = self.N // n  # delta, the distance between timesteps
        t = self.leading(n)
        # the first timestep's successor appears twice: step 2 re-does step 1 with the mean of two eps (a Heun-like
        # start that replaces PNDM's Runge-Kutta warm-up): 961, 921, 921, 881, ... 1 for n=25
        self.timesteps = torch.from_numpy(np.concatenate([t[:-1], t[-2:-1], t[-1:]])[::-1].copy())
        self.ets, self.counter, self.cur_sample = [], 0, None

    def step(self, eps, t, x, generator=None):
        t = int(t)
        t_prev = t - self.ratio
        if self.counter != 1:
            self.ets = self.ets[-3:] + [eps]
        else:  # the repeated timestep: go from t + delta to t again, from the sample saved at step 1
            t_prev, t = t, t + self.ratio
        ets = self.ets
        if len(ets) == 1 and self.counter == 0:
            self.cur_sample = x
        elif len(ets) == 1 and self.counter == 1:
            eps, x, self.cur_sample = (eps + ets[-1]) / 2, self.cur_sample, None
        elif len(ets) == 2:
            eps = (3 * ets[-1] - ets[-2]) / 2
        elif len(ets) == 3:
            eps = (23 * ets[-1] - 16 * ets[-2] + 5 * ets[-3]) / 12
        else:  # PLMS eq. (12): e' = (55 e_t - 59 e_{t-d} + 37 e_{t-2d} - 9 e_{t-3d}) / 24
            eps = (1 / 24) * (55 * ets[-1] - 59 * ets[-2] + 37 * ets[-3] - 9 * ets[-4])
        # note: in img2img the restart at step 2 makes diffusers (and so us) skip one delta of the noise levels
        self.counter += 1
        return self.transfer(x, t, t_prev, eps)

    def transfer(self, x, t, t_prev, eps):
        """PNDM eq. (9), the transfer phi(x_t, e, t, t - delta): the exact DDIM step for a given eps."""
        a_t = self.alphas_cumprod[t]
        a_prev = self.alphas_cumprod[t_prev] if t_prev >= 0 else self.final_alpha_cumprod
        b_t, b_prev = 1 - a_t, 1 - a_prev
        denom = a_t * b_prev ** 0.5 + (a_t * b_t * a_prev) ** 0.5
        return (a_prev / a_t) ** 0.5 * x - (a_prev - a_t) * eps / denom


class DDIM(Sampler):
    """DDIM (eta = 0: deterministic; eta = 1: DDPM-like). Mirrors diffusers `DDIMScheduler`."""

    def __init__(self, cfg=SD_V1, eta=0.0):
        super().__init__(cfg)
        self.eta = eta

    def set_timesteps(self, n):
        self.check_steps(n)
        self.ratio = self.N // n
        self.timesteps = torch.from_numpy(self.leading(n)[::-1].copy())

    def step(self, eps, t, x, generator=None):
        t = int(t)
        t_prev = t - self.ratio
        a_t = self.alphas_cumprod[t]
        a_prev = self.alphas_cumprod[t_prev] if t_prev >= 0 else self.final_alpha_cumprod
        b_t = 1 - a_t
        x0 = (x - b_t ** 0.5 * eps) / a_t ** 0.5                # eq. (12): "predicted x_0"
        if self.cfg.clip_sample:
            x0 = x0.clamp(-1, 1)
        var = ((1 - a_prev) / b_t) * (1 - a_t / a_prev)         # eq. (16): sigma_t(eta)^2 / eta^2
        std = self.eta * var ** 0.5
        direction = (1 - a_prev - std ** 2) ** 0.5 * eps        # eq. (12): "direction pointing to x_t"
        x_prev = a_prev ** 0.5 * x0 + direction
        if self.eta > 0:                                        # eq. (12): the random noise sigma_t * eps_t
            x_prev = x_prev + std * randn(eps.shape, generator, eps.device, eps.dtype)
        return x_prev


def sigmas_at(alphas_cumprod, t):
    """sigma(t) = sqrt((1 - alpha_bar) / alpha_bar) at (fractional) timesteps t, linearly interpolated, then sigma=0
    appended for the final, noise-free point; fp32 as diffusers builds it."""
    s = (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).numpy()
    return torch.from_numpy(np.concatenate([np.interp(t, np.arange(len(s)), s), [0.0]]).astype(np.float32))


def vp(sigma):
    """VE sigma -> DPM-Solver's VP pair (alpha_t, sigma_t): alpha_t = 1/sqrt(1 + sigma^2), sigma_t = sigma alpha_t."""
    a = 1 / ((sigma ** 2 + 1) ** 0.5)
    return a, sigma * a


class DPMSolverPP2M(Sampler):
    """DPM-Solver++(2M): a 2nd-order multistep exponential integrator in log-SNR time lambda = log(alpha_t/sigma_t)
    on the data prediction x_0. Mirrors diffusers `DPMSolverMultistepScheduler` (its defaults: dpmsolver++, order 2,
    midpoint, lower_order_final, final sigma 0)."""
    spacings = ("linspace", "leading")

    def set_timesteps(self, n):
        self.check_steps(n)
        if self.spacing == "linspace":  # n+1 points from 999 to 0, the last (0) dropped: 999, 856, ... 143 for n=7
            t = np.linspace(0, self.N - 1, n + 1).round()[::-1][:-1].astype(np.int64)
        else:
            t = self.leading(n + 1)[::-1][:-1]
        self.timesteps, self.sigmas = torch.from_numpy(t.copy()), sigmas_at(self.alphas_cumprod, t)
        self.index, self.x0_prev = 0, None

    def step(self, eps, t, x, generator=None):
        i, lam = self.index, lambda a, s: torch.log(a) - torch.log(s)
        a_s, s_s = vp(self.sigmas[i])
        x0 = (x - s_s * eps) / a_s  # data prediction x_theta = (x_t - sigma_t eps) / alpha_t
        x = x.float()
        a_t, s_t = vp(self.sigmas[i + 1])
        h = lam(a_t, s_t) - lam(a_s, s_s)
        phi = a_t * (torch.exp(-h) - 1.0)
        if self.x0_prev is None or i == len(self.timesteps) - 1:
            # first order (DPM-Solver++(1) = DDIM): the first step, and the last one, which lands on sigma = 0
            out = (s_t / s_s) * x - phi * x0
        else:  # Algorithm 2: D = x0 + (x0 - x0_prev) / (2 r), r = h_prev / h
            r = (lam(a_s, s_s) - lam(*vp(self.sigmas[i - 1]))) / h
            D1 = (1.0 / r) * (x0 - self.x0_prev)
            out = (s_t / s_s) * x - phi * x0 - 0.5 * phi * D1
        self.x0_prev, self.index = x0, i + 1
        return out.to(eps.dtype)

    def add_noise(self, x0, noise, t):
        a, s = vp(self.sigmas.to(x0.device, x0.dtype)[self.index])  # at the begin index, as diffusers
        return a * x0 + s * noise


class Euler(Sampler):
    """Euler steps of the probability-flow ODE in sigma (Karras et al.). x lives in VE scale (x_VP / sqrt(alpha_bar)),
    so the eps-model sees x / sqrt(1 + sigma^2). Mirrors diffusers `EulerDiscreteScheduler` (s_churn = 0)."""
    spacings = ("linspace", "leading")

    def set_timesteps(self, n):
        self.check_steps(n)
        if self.spacing == "linspace":  # fractional timesteps: 999, 832.5, 666, ... for n=7
            t = np.linspace(0, self.N - 1, n, dtype=np.float32)[::-1].copy()
        else:
            t = self.leading(n, bounded=False)[::-1].astype(np.float32)
        self.timesteps, self.sigmas, self.index = torch.from_numpy(t), sigmas_at(self.alphas_cumprod, t), 0
        # x_T ~ N(0, (sigma_max^2 + 1) I) in VE scale; diffusers takes sigma_max for "linspace" (0.23% less here)
        smax = self.sigmas.max()
        self.init_noise_sigma = smax if self.spacing == "linspace" else (smax ** 2 + 1) ** 0.5

    def scale_model_input(self, x, t):
        return x / ((self.sigmas[self.index] ** 2 + 1) ** 0.5)

    def step(self, eps, t, x, generator=None):
        s, s_next = self.sigmas[self.index], self.sigmas[self.index + 1]
        x = x.float()
        x0 = x - s * eps           # the denoiser D(x; sigma) of an eps-model
        d = (x - x0) / s           # the ODE's slope dx/dsigma = (x - D) / sigma (Karras, sigma(t) = t)
        self.index += 1
        return (x + d * (s_next - s)).to(eps.dtype)  # Algorithm 1's Euler step to sigma_next (no 2nd-order fix)

    def add_noise(self, x0, noise, t):
        return x0 + noise * self.sigmas.to(x0.device, x0.dtype)[self.index]


class EulerAncestral(Euler):
    """Euler to sigma_down, then fresh noise of std sigma_up, so that the marginal at sigma_next is exact
    (sigma_down^2 + sigma_up^2 = sigma_next^2). Mirrors diffusers `EulerAncestralDiscreteScheduler`; the noise is
    drawn from the caller's generator as diffusers does (also at the last step, where sigma_up = 0)."""

    def step(self, eps, t, x, generator=None):
        s, s_next = self.sigmas[self.index], self.sigmas[self.index + 1]
        x = x.float()
        x0 = x - s * eps
        s_up = (s_next ** 2 * (s ** 2 - s_next ** 2) / s ** 2) ** 0.5
        s_down = (s_next ** 2 - s_up ** 2) ** 0.5
        x = x + (x - x0) / s * (s_down - s)
        self.index += 1
        return (x + randn(eps.shape, generator, eps.device, eps.dtype) * s_up).to(eps.dtype)


SAMPLERS = {"pndm": PNDM, "ddim": DDIM, "dpm++2m": DPMSolverPP2M, "euler": Euler, "euler_a": EulerAncestral}

# -----------------------------------------------------------------------------
# The pipelines. `pipe` is a convert_weights.Pipeline: from load_pipeline(), or random_pipeline() below.


@dataclass
class Result:
    """What txt2img and img2img return."""
    images: torch.Tensor   # (B, H, W, 3) uint8 on the CPU; B = len(prompts) * n, each prompt's n images together
    latents: torch.Tensor  # (B, 4, H/8, W/8) final latents, before the 1/scaling_factor
    seed: int              # the generator's initial seed: with the same arguments it reproduces the batch
    times: dict            # seconds per stage: text, (encode,) denoise, decode

    def pil(self):
        return [Image.fromarray(im.numpy()) for im in self.images]


@contextmanager
def stage(times, name, device):
    t0 = time.perf_counter()
    yield
    if device.type == "cuda":  # kernels run asynchronously: wait for them, or the time is wrong
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
    else:  # the next stage's tensors differ in size: hand this one's freed pages back (unet.keep_freed_memory)
        unet.release_freed_memory()
    times[name] = time.perf_counter() - t0


def size_multiple(pipe):
    """Image sides must survive the VAE's 8x and the U-Net's 2x per stage without rounding: 64 for SD v1."""
    return pipe.vae_cfg.downsample_factor * 2 ** (len(pipe.unet_cfg.block_out_channels) - 1)


def check_size(pipe, h, w):
    f = size_multiple(pipe)
    if h % 8 or w % 8 or h <= 0 or w <= 0:
        raise ValueError(f"height and width must be positive multiples of 8, got {h}x{w}")
    if h % f or w % f:
        raise ValueError(f"this model needs height and width divisible by {f} (8 for the VAE x 2 per U-Net "
                         f"downsampling), got {h}x{w}; try {max(h // f * f, f)}x{max(w // f * f, f)}")


def make_sampler(pipe, sampler, steps):
    """A SAMPLERS name (configured from the pipeline's scheduler_config.json) or a sampler instance, with its
    timesteps set for `steps` steps."""
    if isinstance(sampler, str):
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
        sampler = SAMPLERS[sampler](SamplerConfig.from_diffusers(pipe.scheduler_config))
    sampler.set_timesteps(steps)
    return sampler


def encode_prompts(pipe, prompt, negative_prompt, n, guide, device):
    """(B*n, 77, D) text states in one forward pass: [negative..., positive...] when guiding, diffusers' order (its
    torch.cat([negative_prompt_embeds, prompt_embeds])), each prompt's row repeated for its n images."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    negs = [negative_prompt or ""] * len(prompts) if negative_prompt is None or isinstance(negative_prompt, str) \
        else list(negative_prompt)
    if not prompts or len(negs) != len(prompts) or n < 1:
        raise ValueError(f"need >= 1 prompt, n >= 1 and one negative prompt per prompt (or one string), got "
                         f"{len(prompts)} prompts, {len(negs)} negative prompts, n={n}")
    ids = pipe.tokenizer(negs + prompts if guide else prompts).to(device)
    return pipe.text_encoder(ids).repeat_interleave(n, dim=0)


def open_image(image):
    """A path or PIL image -> RGB PIL image, upright (its EXIF orientation applied, as diffusers' load_image does),
    16-bit grey scaled to 8 bits (PIL's convert would clip it at 255); an unreadable file is a ValueError that names
    it."""
    try:
        with nullcontext(image) if isinstance(image, Image.Image) else Image.open(image) as im:
            im = ImageOps.exif_transpose(im)
            if im.mode.startswith("I;16") or im.mode == "I" and im.getextrema()[1] > 255:  # 16-bit grey
                im = Image.fromarray((np.asarray(im, np.float64) / 257).round().clip(0, 255).astype(np.uint8))
            return im.convert("RGB")
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read the init image {image}: {e}") from e


def image_tensor(pipe, image):
    """A path or PIL image -> (1, 3, H, W) in [-1, 1] as diffusers' VaeImageProcessor.preprocess, its sides rounded
    down (LANCZOS, diffusers' default filter) to what the model takes."""
    image, f = open_image(image), size_multiple(pipe)
    W, H = image.size
    if W % f or H % f:
        image = image.resize((max(W // f * f, f), max(H // f * f, f)), Image.LANCZOS)
        print(f"init image resized from {W}x{H} to {image.size[0]}x{image.size[1]}", file=sys.stderr)
    return 2.0 * torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None] - 1.0


class CUDAGraph:
    """A U-Net call recorded once as a CUDA graph, then replayed at every step: the GPU runs the network's few
    hundred kernels back to back, where eager PyTorch spends CPU time launching each one, and at SD's sizes the GPU
    waits for those launches (BENCHMARKS.md, "CUDA graphs"). The same kernels run, on the same numbers. A graph reads
    and writes fixed buffers: a call copies x and t in and the output out, and `context` must stay the tensor of
    the first call (the shapes and the text do not change within one txt2img)."""

    def __init__(self, unet):
        self.unet, self.graph = unet, None

    def __call__(self, x, t, context):
        with torch.cuda.device(x.device):  # record and replay on x's GPU, whichever one is current (several GPUs)
            if self.graph is None:
                return self.record(x, t, context)
            self.x.copy_(x)
            self.t.copy_(torch.as_tensor(t))
            self.graph.replay()
            return self.out.clone()  # the next replay overwrites out; the samplers keep past eps

    def record(self, x, t, context):
        """The first call: the warm-up that capture needs, on a side stream (its eps is this step's), then capture."""
        self.x, self.t = x.clone(), torch.as_tensor(t, device=x.device).clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            eps = self.unet(self.x, self.t, context)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = self.unet(self.x, self.t, context)
        return eps


@torch.no_grad()
def txt2img(pipe, prompt, negative_prompt=None, steps=25, guidance=7.5, height=None, width=None, n=1,
            generator=None, sampler="pndm", latents=None, progress=True, offload_text_encoder=False,
            init_image=None, strength=1.0, cuda_graph=True):
    """Text -> images, as diffusers' StableDiffusionPipeline.__call__ computes them. Returns a Result.

    prompt: str or list; negative_prompt: None (""), a str for all prompts, or one per prompt; n images per prompt.
    generator: a seed, a torch.Generator, or None (a fresh seed, returned in Result.seed). sampler: a SAMPLERS name,
    built from pipe.scheduler_config, or a sampler instance (e.g. DDIM(eta=1.0)). latents replaces the initial
    noise draw. It runs where the U-Net is, in its dtype (pipe.to(device, dtype) moves a pipeline).
    offload_text_encoder: move CLIP to the CPU once the prompts are encoded (lower peak GPU memory).
    init_image, strength: img2img's start (see img2img below). cuda_graph: on a CUDA device, replay the U-Net as
    one CUDA graph (CUDAGraph above; the same numbers, faster).
    """
    f = pipe.vae_cfg.downsample_factor
    if init_image is None:  # SD v1: 512 x 512
        height, width = height or pipe.unet_cfg.sample_size * f, width or pipe.unet_cfg.sample_size * f
    else:
        height, width = init_image.shape[2:]
    check_size(pipe, height, width)
    sampler = make_sampler(pipe, sampler, steps)
    timesteps = sampler.timesteps
    if not isinstance(generator, torch.Generator):  # a seed, or None: a fresh one (the global RNG is left alone)
        generator = torch.Generator().manual_seed(torch.Generator().seed() if generator is None else generator)
    p = next(pipe.unet.parameters())  # where the U-Net is, in its dtype, the run is
    device, dtype, times, guide = p.device, p.dtype, {}, guidance > 1
    # 1. the text: (B*n, 77, D) states; guide = classifier-free guidance (diffusers: guidance_scale > 1)
    with stage(times, "text", device):
        if offload_text_encoder:  # back from the previous call's offload, if any
            pipe.text_encoder.to(device)
        context = encode_prompts(pipe, prompt, negative_prompt, n, guide, device)
        if offload_text_encoder and device.type != "cpu":  # give its memory to the U-Net's activations
            pipe.text_encoder.to("cpu")
    B = context.shape[0] // (2 if guide else 1)
    if init_image is None:
        # 2. the initial noise x_T ~ N(0, I), times sigma_max for the Karras-style samplers. One draw from the
        # generator on its device (the CPU for seeds): a seed gives diffusers' image on any device.
        shape = (B, pipe.unet_cfg.in_channels, height // f, width // f)
        x = randn(shape, generator, device, dtype) if latents is None else latents.to(device, dtype)
        x = x * sampler.init_noise_sigma
    else:
        # 2'. img2img (SDEdit): the encoded image, noised by q(x_t | x_0) to the first of the last int(steps *
        # strength) timesteps (diffusers' get_timesteps); the encoding is a posterior sample (its retrieve_latents)
        k = min(int(steps * strength), steps)
        timesteps = sampler.start_at(steps - k) if k else sampler.timesteps[:0]
        with stage(times, "encode", device):
            x = pipe.vae.encode(init_image.to(device, dtype)).sample(generator) * pipe.vae_cfg.scaling_factor
        x = x.repeat(B // x.shape[0], 1, 1, 1)  # one image -> B*n
        if k:
            x = sampler.add_noise(x, randn(x.shape, generator, device, dtype), timesteps[:1].repeat(B))
    # 3. the reverse process x_T -> x_0: at each timestep the U-Net predicts the noise eps and the sampler steps.
    # Classifier-free guidance (Ho & Salimans, arXiv 2207.12598) runs the unconditional and the conditional half in
    # one U-Net batch: eps = eps_uncond + guidance * (eps_cond - eps_uncond). The U-Net gets x once with both texts
    # and runs its layers before the text enters once for the pair (UNet.forward).
    unet_call = CUDAGraph(pipe.unet) if cuda_graph and device.type == "cuda" else pipe.unet
    with stage(times, "denoise", device):
        for t in tqdm(timesteps, "denoise", disable=not progress):
            eps = unet_call(sampler.scale_model_input(x, t), t, context)
            if guide:
                eps_uncond, eps_cond = eps.chunk(2)
                eps = eps_uncond + guidance * (eps_cond - eps_uncond)
            x = sampler.step(eps, t, x, generator=generator)
    if not torch.isfinite(x).all():  # checked once, not per step: the loop stays free of GPU->CPU syncs
        raise RuntimeError(f"the latents hold NaN/inf after denoising in {x.dtype}: a float16 overflow in the U-Net? "
                           "Run with --dtype bfloat16 or --dtype float32 (dtype=torch.float32).")
    # 4. latents -> pixels, rounded as diffusers' numpy_to_pil: round(255 * clamp(x / 2 + 0.5, 0, 1))
    with stage(times, "decode", device):
        img = pipe.vae.decode(x / pipe.vae_cfg.scaling_factor)  # undo the 0.18215 that made latents unit-variance
    if not torch.isfinite(img).all():
        raise RuntimeError(f"the VAE decoder produced NaN/inf in {img.dtype}: decode in float32 (--dtype float32)")
    img = ((img / 2 + 0.5).clamp(0, 1).float() * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()
    return Result(img, x, generator.initial_seed(), times)


def img2img(pipe, image, prompt, strength=0.8, **kw):
    """Image + text -> images (SDEdit, Meng et al., arXiv 2108.01073), as diffusers' StableDiffusionImg2ImgPipeline.

    image: a path, a PIL image (resized down to a multiple of 64 if needed, up to 64 if smaller) or a (1, 3, H, W)
    tensor in [-1, 1].
    The last int(steps * strength) of the `steps` timesteps are run, from the encoded image noised to the first of
    them. strength 1 starts at the first timestep, as in diffusers: with 25 "leading" steps that is t = 961,
    where sqrt(alpha_bar) = 0.085 of the image remains. If steps * strength < 1 (strength 0, or few steps)
    no step is run and the result is the image's VAE round trip (the encoded latents, no noise added), where
    diffusers fails or runs one step. Other arguments (keywords) as txt2img.
    """
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must lie in [0, 1], got {strength}")
    image = image if torch.is_tensor(image) else image_tensor(pipe, image)
    if image.dim() != 4 or image.shape[:2] != (1, 3):
        raise ValueError(f"image: one (1, 3, H, W) tensor, got {tuple(image.shape)}")
    return txt2img(pipe, prompt, init_image=image, strength=strength, **kw)

# -----------------------------------------------------------------------------
# Offline smoke runs: a whole pipeline with RANDOM weights (the images are noise; the code path is the real one)


def toy_tokenizer():
    """A byte-level CLIP tokenizer with no merges (every byte a token), for when the real vocabulary is not
    installed: ids < 49408, so any CLIP embedding table takes them."""
    sym = clip_text.bytes_to_unicode_symbols()
    vocab = sym + [s + "</w>" for s in sym] + ["<|startoftext|>", "<|endoftext|>"]
    return clip_text.Tokenizer.from_bpe({t: i for i, t in enumerate(vocab)}, [])


def random_pipeline(preset="tiny-test", seed=0, tokenizer=None):
    """U-Net `preset` (unet.PRESETS) with the CLIP and VAE of its family (tiny-test or sd-v1), seeded random weights."""
    family = "tiny-test" if preset == "tiny-test" else "sd-v1"
    ucfg, tcfg, vcfg = unet.PRESETS[preset], clip_text.PRESETS[family], vae.PRESETS[family]
    vocab = clip_text.find_openai_vocab()
    tok = tokenizer or (clip_text.Tokenizer(vocab) if vocab else toy_tokenizer())
    with torch.random.fork_rng(devices=[]):  # seeded weights, the caller's global RNG state untouched
        torch.manual_seed(seed)
        models = unet.UNet(ucfg).eval(), clip_text.CLIPTextModel(tcfg).eval(), vae.AutoencoderKL(vcfg).eval()
    return cw.Pipeline(unet=models[0], text_encoder=models[1], tokenizer=tok, vae=models[2], unet_cfg=ucfg,
                       text_cfg=tcfg, vae_cfg=vcfg, scheduler_config={},  # {}: the SD v1 schedule
                       name=f"RANDOM WEIGHTS ({preset}, seed {seed})")

# -----------------------------------------------------------------------------
# Command line:  python sampler.py "a photo of a cat" [--sampler pndm --steps 25 --seed 0 --out cat.png]


def native_bf16():
    """Does this CPU multiply bf16 in hardware (AVX512-BF16 or AMX)? There bf16 is much faster than fp32 and its
    pixels stay close (BENCHMARKS.md)."""
    return any(unet.cpu_has("avx512_bf16", "amx_tile"))


def write_png(im, path, meta):
    """Save with the parameters as PNG text: "parameters" in the A1111 convention (read by image viewers and web
    UIs) and "minisd", all fields as JSON. Written to a temporary name, then renamed: never a partial file."""
    info = PngInfo()
    info.add_text("parameters", f"{meta['prompt']}\nNegative prompt: {meta['negative_prompt']}\nSteps: "
                  f"{meta['steps']}, Sampler: {meta['sampler']}, CFG scale: {meta['guidance']}, Seed: {meta['seed']}, "
                  f"Size: {meta['width']}x{meta['height']}, Model: {meta['model']}"
                  + (f", Batch size: {meta['batch_size']}, Batch pos: {meta['batch_index']}" if meta["batch_size"] > 1
                     else "")
                  + (f", Denoising strength: {meta['strength']}" if meta["strength"] is not None else "")
                  + ("\n*** RANDOM WEIGHTS: a smoke run, not a model ***" if meta["random_weights"] else ""))
    info.add_text("minisd", json.dumps(meta))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    im.save(tmp, format="PNG", pnginfo=info)
    os.replace(tmp, path)
    print(f"wrote {path}", file=sys.stderr)


def check_args(args, ap):
    """Every argument checked before a model loads: a mistake costs no time and writes no file. Returns the prompts,
    the init image, device, dtype and seed."""
    if (args.prompt is None) == (args.prompts_file is None):
        ap.error("give a prompt or --prompts-file (one prompt a line), not both")
    try:
        prompts = [args.prompt] if args.prompts_file is None else \
            [p for p in Path(args.prompts_file).read_text(encoding="utf-8-sig").splitlines() if p.strip()]
        init = open_image(args.init_image) if args.init_image else None
    except (OSError, ValueError) as e:
        ap.error(str(e))
    for name, v in (("height", args.height), ("width", args.width)):
        if v is not None and (v <= 0 or v % 8):
            ap.error(f"--{name} must be a positive multiple of 8, got {v}")
    if not prompts or args.steps < 1 or args.n < 1 or args.batch < 1 or not 0 <= args.strength <= 1:
        ap.error("need a non-empty prompt list, --steps >= 1, --n >= 1, --batch >= 1 and 0 <= --strength <= 1")
    if not math.isfinite(args.guidance):  # nan would silently turn guidance off (nan > 1 is False)
        ap.error(f"--guidance must be a finite number, got {args.guidance}")
    if args.seed is not None and not -1 <= args.seed < 2 ** 63:
        ap.error(f"--seed must be -1 (random, the A1111 convention) or in 0..2^63-1, got {args.seed}")
    out = Path(args.out)
    folder = out.parent if out.suffix.lower() == ".png" else out
    try:  # can the output be written? Found out now, not after the whole generation
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        ap.error(f"cannot write to {folder}: {e.strerror or e}")
    mps = sys.platform == "darwin" and torch.backends.mps.is_available()
    device = args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "mps" if mps else "cpu"
    if device == "cuda" and not torch.cuda.is_available() or device == "mps" and not mps:
        ap.error(f"--device {device} is not available on this machine")
    auto = torch.float16 if device == "cuda" else torch.bfloat16 if device == "cpu" and native_bf16() else torch.float32
    dtype = cw.DTYPES.get(args.dtype, auto)
    if dtype == torch.float16 and device == "cpu":
        ap.error("float16 on the CPU is not supported (PyTorch lacks or slows its CPU half kernels, e.g. "
                 "'addmm_impl_cpu_' not implemented for 'Half'): use --dtype float32 or bfloat16")
    if dtype == torch.bfloat16 and device == "cpu" and not native_bf16():  # honoured: half the memory
        print("warning: this CPU has no bf16 arithmetic (AVX512-BF16, AMX), so bfloat16 runs slowly here (a "
              "BK-SDM-Tiny U-Net step 7.5x float32's time on AVX2); --dtype auto picks float32", file=sys.stderr)
    seed = args.seed if args.seed not in (None, -1) else torch.Generator().seed() % 2 ** 32
    return prompts, init, torch.device(device), dtype, seed


def load_model(args, device, dtype):
    """--random-weights, --weights, or the default model from the Hugging Face cache, fetched on first use."""
    if args.random_weights:
        size = f"{args.height}x{args.width}" if args.height else "the init image's size"
        print("*" * 80 + f"\n*** SMOKE RUN: a {args.preset} U-Net with RANDOM weights, {size}. The "
              "images are noise:\n*** this checks that the code runs, offline, in seconds; it is not a model.\n"
              + "*" * 80, file=sys.stderr)
        return random_pipeline(args.preset).to(device, dtype)
    path = args.weights or cw.cached(cw.DEFAULT_REPO)
    try:
        path = path or cw.download(cw.DEFAULT_REPO)
    except OSError as e:  # no network, a gated repo without HF_TOKEN: all OSErrors with a message
        sys.exit(f"error: no local copy of {cw.DEFAULT_REPO} and it cannot be fetched ({e}).\nPass --weights PATH "
                 "(a diffusers folder or a .safetensors/.ckpt file), or run offline: --random-weights")
    try:
        return cw.load_pipeline(path, dtype=dtype, device=device, arch=args.arch)
    except (OSError, ValueError) as e:  # the converter's messages name the file and what is wrong
        sys.exit(f"error: {e}")


def main(args, ap):
    unet.keep_freed_memory()  # this process is ours: no page faults on every step's activations
    unet.PREPACK = unet.PREPACK and not args.low_memory  # no packed or transformed copy: plain convolutions
    sized = args.height or args.width  # with --init-image: the image is resized to the size asked for
    if args.random_weights and not args.init_image:  # small by default: the smoke run is about the code
        args.height, args.width = args.height or 128, args.width or 128
    prompts, init, device, dtype, seed = check_args(args, ap)
    if init and sized:
        init = init.resize((args.width or init.width, args.height or init.height), Image.LANCZOS)
    pipe = load_model(args, device, dtype)
    # generate batch by batch (batch k uses seed + k) and write each image once it is complete
    out, times, k = Path(args.out), {}, 0
    for b in range(0, len(prompts), args.batch):
        batch = prompts[b:b + args.batch]
        kw = dict(negative_prompt=args.negative, steps=args.steps, guidance=args.guidance, n=args.n,
                  generator=seed + b // args.batch, sampler=args.sampler, offload_text_encoder=device.type != "cpu")
        try:
            r = img2img(pipe, init, batch, strength=args.strength, **kw) if init else \
                txt2img(pipe, batch, height=args.height, width=args.width, **kw)
        except (ValueError, RuntimeError) as e:
            sys.exit(f"error: {e}")
        times = {s: times.get(s, 0.0) + v for s, v in r.times.items()}
        for j, im in enumerate(r.pil()):
            meta = dict(prompt=batch[j // args.n], negative_prompt=args.negative, seed=r.seed, batch_index=j,
                        batch_size=len(batch) * args.n,  # the noise of image j is a slice of the batch's one draw
                        steps=args.steps, sampler=args.sampler, guidance=args.guidance, height=im.height,
                        width=im.width, model=str(pipe.name), dtype=str(dtype)[6:],
                        strength=args.strength if init else None, random_weights=args.random_weights)
            slug = re.sub(r"[^a-z0-9]+", "_", meta["prompt"].lower()).strip("_")[:40] or "image"
            single = out.suffix.lower() == ".png"  # else a folder
            write_png(im, (out if len(prompts) * args.n == 1 else out.with_name(f"{out.stem}_{k}.png")) if single
                      else out / f"{k:04d}_{slug}.png", meta)
            k += 1
    print(f"seed {seed}; times: " + ", ".join(f"{s} {v:.2f} s" for s, v in times.items()), file=sys.stderr)


def parser():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("prompt", nargs="?", help="what to draw")
    # the model
    ap.add_argument("--weights", help="a diffusers folder or a single .safetensors/.ckpt file (default: "
                                      "nota-ai/bk-sdm-small from the Hugging Face cache, fetched on first use)")
    ap.add_argument("--arch", help="U-Net preset of a single-file checkpoint, when it cannot be inferred")
    ap.add_argument("--random-weights", action="store_true",
                    help="offline smoke run with random weights (128x128 unless --height/--width)")
    ap.add_argument("--preset", default="tiny-test", choices=list(unet.PRESETS), help="U-Net of --random-weights")
    # sampling
    ap.add_argument("--sampler", default="pndm", choices=list(SAMPLERS))
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale; <= 1 turns it off")
    ap.add_argument("--seed", type=int, help="default or -1: random (printed, and stored in the PNG metadata)")
    ap.add_argument("--negative", default="", help="negative prompt")
    ap.add_argument("--height", type=int, help="default: the model's (512 for SD v1); with --init-image: resize it")
    ap.add_argument("--width", type=int)
    ap.add_argument("--n", type=int, default=1, help="images per prompt")
    ap.add_argument("--prompts-file", help="one prompt a line, instead of the prompt argument")
    ap.add_argument("--batch", type=int, default=1, help="prompts per batch (batch k uses seed + k)")
    ap.add_argument("--init-image", help="img2img: the image to start from")
    ap.add_argument("--strength", type=float, default=0.8, help="img2img: 0 keeps the image, 1 redraws it")
    # output and hardware
    ap.add_argument("--out", default="out.png", help="a .png file (name_0.png, ... for several) or a folder")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                    help="auto: float16 on cuda, bfloat16 on a CPU with native bf16 (AVX512-BF16, AMX), else float32")
    ap.add_argument("--low-memory", action="store_true",
                    help="CPU: keep no second copy of the convolution weights (oneDNN's packed one, Winograd's "
                         "transformed one in fp32): less memory, slower steps (BENCHMARKS.md)")
    return ap


if __name__ == "__main__":
    cli = parser()
    main(cli.parse_args(), cli)
