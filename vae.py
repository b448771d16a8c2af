"""
The KL-regularised autoencoder of Latent Diffusion: the encoder maps an RGB image in [-1, 1] to a diagonal Gaussian
over a 4-channel latent 8x smaller per side, the decoder maps a latent back; SD's U-Net works in between.

References
1) Rombach et al., "High-Resolution Image Synthesis with Latent Diffusion Models", arXiv 2112.10752
   (sec. 3.1 and appendix G: the "KL-f8" autoencoder; sec. 4.3.2 and D.1: latent rescaling).
2) Numerical reference: diffusers 0.42 `AutoencoderKL` (models/autoencoders/autoencoder_kl.py and vae.py).
Checkpoint format: diffusers' current parameter names (`encoder.down_blocks.0.resnets.1.conv1`, Linear
`decoder.mid_block.attentions.0.to_q`), so SD v1.4/v1.5 `vae/` folders (BK-SDM reuses SD v1.4's) load with
`load_state_dict(strict=True)`. CompVis names and old diffusers `query/key/value` go through convert_weights.py.

Scaling: like diffusers' model (not its pipeline), encode() and decode() do NOT apply `scaling_factor`;
the sampler multiplies latents by `cfg.scaling_factor` after encode and divides by it before decode.
Extension point: tiled *encoding* (img2img on huge images) would mirror decode_tiled().
"""
import argparse
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

from unet import Conv2d, attention, fast_layout, randn  # the project's attention, noise and fp32 Winograd

# -----------------------------------------------------------------------------
# Config


@dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3                               # RGB in [-1, 1]
    out_channels: int = 3
    latent_channels: int = 4                           # the "4" of SD's 4 x 64 x 64 latent
    block_out_channels: tuple = (128, 256, 512, 512)   # one entry per stage; each stage but the last halves H, W
    layers_per_block: int = 2                          # resnets per encoder stage; decoder stages have one more
    norm_num_groups: int = 32
    norm_eps: float = 1e-6                             # LDM's autoencoder used GroupNorm eps 1e-6 everywhere
    # LDM set it to 1 / std of the encoder's latents on its first training batch (`scale_by_std`; std ~ 5.49)
    # so that the diffusion model sees unit-variance latents (paper sec. 4.3.2, D.1). The sampler applies it.
    scaling_factor: float = 0.18215
    attention: str = "auto"                            # mid-block attention: unet.attention()'s impl

    @property
    def downsample_factor(self):  # image side / latent side: 8 for SD v1
        return 2 ** (len(self.block_out_channels) - 1)


PRESETS = {
    "sd-v1": VAEConfig(),  # 83.65M parameters; SD v1.x and all BK-SDM models share this VAE
    "tiny-test": VAEConfig(block_out_channels=(8, 16, 32, 32), norm_num_groups=4),  # sd-v1 topology, toy width
    "toy": VAEConfig(block_out_channels=(16, 32, 64, 64), layers_per_block=1, norm_num_groups=8),  # toy.py's
}

# -----------------------------------------------------------------------------
# Building blocks (bottom-up), each mirroring the diffusers class it names


class ResnetBlock2D(nn.Module):
    """Mirrors diffusers `ResnetBlock2D` with temb_channels=None (LDM: `ResnetBlock`): the U-Net's resnet
    without the timestep, since the autoencoder is not conditioned on anything."""
    def __init__(self, c_in, c_out, cfg):
        super().__init__()
        self.norm1 = nn.GroupNorm(cfg.norm_num_groups, c_in, eps=cfg.norm_eps)
        self.conv1 = Conv2d(c_in, c_out, 3, padding=1, prepack=False)
        self.norm2 = nn.GroupNorm(cfg.norm_num_groups, c_out, eps=cfg.norm_eps)
        self.conv2 = Conv2d(c_out, c_out, 3, padding=1, prepack=False)
        # a 1x1 conv matches channels on the residual path when they change
        self.conv_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))  # (dropout 0 in SD: omitted)
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class AttentionBlock(nn.Module):
    """Mirrors diffusers `Attention` as built by `UNetMidBlock2D` (LDM: `AttnBlock`): GroupNorm, then one
    head of self-attention over all H*W pixels with C=512 channels, then a residual add."""
    def __init__(self, c, cfg):
        super().__init__()
        self.impl = cfg.attention
        self.group_norm = nn.GroupNorm(cfg.norm_num_groups, c, eps=cfg.norm_eps)
        self.to_q, self.to_k, self.to_v = nn.Linear(c, c), nn.Linear(c, c), nn.Linear(c, c)
        self.to_out = nn.ModuleList([nn.Linear(c, c), nn.Dropout(0.0)])  # index 1 is Dropout: kept so keys match

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.group_norm(x).flatten(2).transpose(1, 2)  # (B, H*W, C) tokens
        h = attention(self.to_q(h), self.to_k(h), self.to_v(h), heads=1, impl=self.impl)
        return x + self.to_out[0](h).transpose(1, 2).reshape(B, C, H, W)


class Downsample2D(nn.Module):
    """Mirrors diffusers `Downsample2D(padding=0)`: pad right and bottom by one pixel, then a stride-2 3x3 conv.
    LDM trained it so; symmetric padding=1 gives the same shape on a grid shifted by a pixel (other weights)."""
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample2D(nn.Module):
    """Mirrors diffusers `Upsample2D`: nearest-neighbour x2, then a 3x3 conv (same as unet.py)."""
    def __init__(self, c):
        super().__init__()
        self.conv = Conv2d(c, c, 3, padding=1, prepack=False)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Stage(nn.Module):
    """Mirrors diffusers `DownEncoderBlock2D` (resnets, `downsamplers`) and `UpDecoderBlock2D` (resnets,
    `upsamplers`): an empty ModuleList adds no state-dict keys, so one class serves both directions."""
    def __init__(self, c_in, c_out, n, cfg, resample=None):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(c_in if i == 0 else c_out, c_out, cfg) for i in range(n)])
        self.downsamplers = nn.ModuleList([Downsample2D(c_out)] if resample == "down" else [])
        self.upsamplers = nn.ModuleList([Upsample2D(c_out)] if resample == "up" else [])

    def forward(self, h):
        for layer in (*self.resnets, *self.downsamplers, *self.upsamplers):
            h = layer(h)
        return h


class MidBlock(nn.Module):
    """Mirrors diffusers `UNetMidBlock2D`: resnet, attention, resnet at the lowest resolution (64x64 for 512px)."""
    def __init__(self, c, cfg):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(c, c, cfg), ResnetBlock2D(c, c, cfg)])
        self.attentions = nn.ModuleList([AttentionBlock(c, cfg)])

    def forward(self, h):
        return self.resnets[1](self.attentions[0](self.resnets[0](h)))


class Encoder(nn.Module):
    """Mirrors diffusers `Encoder` (double_z=True): image -> 2 * latent_channels moments (mean, log-variance)."""
    def __init__(self, cfg):
        super().__init__()
        ch, n = cfg.block_out_channels, len(cfg.block_out_channels)
        self.conv_in = Conv2d(cfg.in_channels, ch[0], 3, padding=1, prepack=False)
        self.down_blocks = nn.ModuleList([Stage(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, cfg,
                                                "down" if i < n - 1 else None) for i in range(n)])
        self.mid_block = MidBlock(ch[-1], cfg)
        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, ch[-1], eps=cfg.norm_eps)
        self.conv_out = Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1, prepack=False)

    def forward(self, h):
        for block in (self.conv_in, *self.down_blocks, self.mid_block):
            h = block(h)
        return self.conv_out(F.silu(self.conv_norm_out(h)))


class Decoder(nn.Module):
    """Mirrors diffusers `Decoder`: latent -> image, widest stage first (LDM's `up.3` is our `up_blocks.0`)."""
    def __init__(self, cfg):
        super().__init__()
        ch, n = cfg.block_out_channels[::-1], len(cfg.block_out_channels)
        self.conv_in = Conv2d(cfg.latent_channels, ch[0], 3, padding=1, prepack=False)
        self.mid_block = MidBlock(ch[0], cfg)
        self.up_blocks = nn.ModuleList([Stage(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block + 1, cfg,
                                              "up" if i < n - 1 else None) for i in range(n)])
        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, ch[-1], eps=cfg.norm_eps)
        self.conv_out = Conv2d(ch[-1], cfg.out_channels, 3, padding=1, prepack=False)

    def forward(self, h):
        for block in (self.conv_in, self.mid_block, *self.up_blocks):
            h = block(h)
        return self.conv_out(F.silu(self.conv_norm_out(h)))


class DiagonalGaussian:
    """The encoder's posterior q(z|x) = N(mean, diag(exp(logvar))). Mirrors diffusers
    `DiagonalGaussianDistribution`, including the logvar clamp to [-30, 20] (LDM's, so exp() stays finite)."""
    def __init__(self, moments):
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator=None):
        """mean + std * eps. eps is drawn on the generator's device (CPU when generator is None) and then moved,
        so one seed gives the same latent on any device; the same draw as diffusers with that generator."""
        return self.mean + self.std * randn(self.mean.shape, generator, self.mean.device, self.mean.dtype)

    def mode(self):
        return self.mean

# -----------------------------------------------------------------------------
# The model


def tiles_1d(n, tile, overlap, f, like):
    """Along a latent axis of length n: (start, blend weight over its image pixels) of the fewest evenly spread
    tiles overlapping by >= `overlap`. Weights ramp linearly over f * overlap pixels at shared edges, never to 0."""
    count = 1 if n <= tile else -(-(n - overlap) // (tile - overlap))  # ceil division
    size, ramp = min(n, tile) * f, max(overlap * f, 1)
    p = torch.arange(size, device=like.device, dtype=like.dtype) + 0.5  # pixel centres
    for i in range(count):
        up = p / ramp if i > 0 else torch.ones_like(p)
        down = (size - p) / ramp if i < count - 1 else torch.ones_like(p)
        yield round(i * (n - tile) / max(count - 1, 1)), torch.minimum(up, down).clamp(max=1.0)


class AutoencoderKL(nn.Module):
    """Mirrors diffusers `AutoencoderKL`. encode(): image (B, 3, H, W) in [-1, 1] -> DiagonalGaussian over
    (B, 4, H/8, W/8); decode(): latent -> image. Neither applies cfg.scaling_factor (see the module docstring)."""
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder, self.decoder = Encoder(cfg), Decoder(cfg)
        # 1x1 convs between the autoencoder and the latent space, named after VQGAN's quantiser (none here)
        self.quant_conv = nn.Conv2d(2 * cfg.latent_channels, 2 * cfg.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(cfg.latent_channels, cfg.latent_channels, 1)

    def encode(self, x):
        cfg, f = self.cfg, self.cfg.downsample_factor
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"image must be (B, {cfg.in_channels}, H, W), got {tuple(x.shape)}")
        if x.shape[2] % f or x.shape[3] % f:
            raise ValueError(f"image sides {tuple(x.shape[2:])} must be multiples of {f} (the encoder halves them)")
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))

    def decode(self, z, tile_size=None, overlap=None):
        """Latent (B, 4, h, w) -> image (B, 3, 8h, 8w). With tile_size set, decode in tiles (decode_tiled)."""
        if z.ndim != 4 or z.shape[1] != self.cfg.latent_channels:
            raise ValueError(f"latent must be (B, {self.cfg.latent_channels}, h, w), got {tuple(z.shape)}")
        if tile_size is not None and max(z.shape[2:]) > tile_size:
            return self.decode_tiled(z, tile_size, overlap)
        return self.decoder(self.post_quant_conv(fast_layout(z))).contiguous()

    def decode_tiled(self, z, tile_size=64, overlap=None):
        """Decode overlapping latent tiles one at a time: activation memory is one tile's (default 64 = 512 px,
        SD v1's training size) however large the image. Neighbours overlap by >= `overlap` (default a quarter
        tile, as diffusers: 16); the output is the average weighted by linear ramps (tiles_1d): a crossfade at seams.
        Not exact: GroupNorm statistics and the mid-block attention are per tile, and pixels near a tile edge see
        less context; diffusers' tiled_decode shares this. The error, measured against the full decode and against
        diffusers' (BENCHMARKS.md, "Tiled VAE decoding"), shrinks with bigger tiles; TestVAE bounds it at the defaults.
        """
        overlap = tile_size // 4 if overlap is None else overlap
        if not 0 <= overlap < tile_size:
            raise ValueError(f"need 0 <= overlap ({overlap}) < tile_size ({tile_size})")
        z = self.post_quant_conv(z)  # a 1x1 conv: the same on the whole latent or per tile
        f, (B, _, h, w) = self.cfg.downsample_factor, z.shape
        out, weight = z.new_zeros(B, self.cfg.out_channels, h * f, w * f), z.new_zeros(h * f, w * f)
        for y0, wy in tiles_1d(h, tile_size, overlap, f, z):
            for x0, wx in tiles_1d(w, tile_size, overlap, f, z):
                tile = self.decoder(z[:, :, y0:y0 + tile_size, x0:x0 + tile_size])
                ys, xs = slice(y0 * f, y0 * f + len(wy)), slice(x0 * f, x0 * f + len(wx))
                out[:, :, ys, xs] += tile * torch.outer(wy, wx)
                weight[ys, xs] += torch.outer(wy, wx)
        return out / weight

    def forward(self, x):
        """Reconstruct x through the posterior mean (diffusers' forward with sample_posterior=False)."""
        return self.decode(self.encode(x).mode())

# -----------------------------------------------------------------------------
# Command line:  python vae.py --preset tiny-test --random-weights


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--preset", default="sd-v1", choices=list(PRESETS))
    ap.add_argument("--weights", help="diffusers-layout VAE .safetensors (vae/diffusion_pytorch_model.safetensors)")
    ap.add_argument("--random-weights", action="store_true", help="offline smoke run: no weights, output is noise")
    ap.add_argument("--size", type=int, default=256, help="image side of the synthetic round-trip image")
    ap.add_argument("--tile-size", "--tile_size", type=int, default=None, help="decode in latent tiles of this side")
    ap.add_argument("--attention", default="sdpa", choices=["sdpa", "tiled"])
    args = ap.parse_args()
    if args.size < 8 or args.size % 8:
        ap.error(f"--size must be a positive multiple of 8, got {args.size}")
    torch.manual_seed(0)
    model = AutoencoderKL(replace(PRESETS[args.preset], attention=args.attention)).eval()
    n = lambda *ms: f"{sum(p.numel() for mod in ms for p in mod.parameters()):,}"
    print(f"VAE {args.preset}: {n(model)} parameters (encoder + quant_conv {n(model.encoder, model.quant_conv)}, "
          f"decoder + post_quant_conv {n(model.decoder, model.post_quant_conv)})")
    if args.weights:
        model.load_state_dict(load_file(args.weights), strict=True)
    elif args.random_weights:
        print("*** SMOKE RUN: RANDOM weights; the reconstruction is noise, not a test of quality ***")
    else:
        raise SystemExit("for a round trip pass --weights FILE, or --random-weights for an offline smoke run")
    t = torch.linspace(0, 6.28, args.size)  # a smooth synthetic image in [-1, 1], easy for a trained VAE
    x = torch.stack([torch.sin(t[:, None] + c + t[None, :] * (c + 1) / 2) for c in range(3)])[None] * 0.8
    with torch.no_grad():
        z = model.encode(x).mode()
        y = model.decode(z, tile_size=args.tile_size).clamp(-1, 1)
    psnr = 10 * torch.log10(4 / F.mse_loss(y, x))  # the peak-to-peak range of [-1, 1] is 2, squared 4
    print(f"image {tuple(x.shape)} -> latent {tuple(z.shape)} (std x scaling_factor: "
          f"{z.std() * model.cfg.scaling_factor:.3f}) -> {tuple(y.shape)}: PSNR {psnr:.1f} dB")
