"""
The minisd test suite. Run:  python -m pytest -q test_all.py

Tier A (always): shapes, exact parameter and MAC counts, closed-form attention maths, error messages.
Tier B (when the oracles from requirements-dev.txt are installed): numerical parity with diffusers /
transformers built from the same config and the same random weights, loaded with strict=True.
"Relative error" below is max|ours - reference| / max|reference|, the standard's fp32 bound is 1e-4.
No test downloads anything: every model is built here with random weights.
"""
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import unet
from unet import PRESETS, UNet, UNetConfig, attention, tiled_attention

HERE = Path(__file__).parent


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def narrow(cfg):
    """The same topology at toy width: what 'every preset at reduced width' is tested on."""
    n = len(cfg.block_out_channels)
    return replace(cfg, block_out_channels=(32, 64, 64, 64)[:n], num_heads=(2, 2, 4, 4)[:n],
                   cross_attention_dim=32, norm_num_groups=16)


def diffusers_twin(cfg, ours):
    """diffusers' UNet2DConditionModel for cfg, sharing our (random) weights via a strict load."""
    diffusers = pytest.importorskip("diffusers")
    d = {k: v for k, v in cfg.to_diffusers().items() if not k.startswith("_")}
    with torch.device("meta"):  # no second random init: the weights come from ours
        ref = diffusers.UNet2DConditionModel(**d)
    ref.load_state_dict(ours.state_dict(), strict=True, assign=True)
    return ref.eval()


def check_parity(cfg, B=2, H=16, W=16, t=None, seed=0):
    torch.manual_seed(seed)
    ours = UNet(cfg).eval()
    ref = diffusers_twin(cfg, ours)
    x = torch.randn(B, cfg.in_channels, H, W)
    ctx = torch.randn(B, 77, cfg.cross_attention_dim)
    t = torch.randint(0, 1000, (B,)) if t is None else t  # a different timestep per sample
    with torch.no_grad():
        a, b = ours(x, t, ctx), ref(x, t, ctx).sample
    err = rel_err(a, b)
    assert a.shape == (B, cfg.out_channels, H, W)
    assert err <= 1e-4, f"max relative error {err:.2e}"
    return ours, err

# -----------------------------------------------------------------------------
# unet.py: counts


@pytest.mark.parametrize("preset,count", [("sd-v1", 859_520_964), ("bk-base", 579_384_964),
                                          ("bk-small", 482_346_884), ("bk-tiny", 323_384_964)])
def test_parameter_counts(preset, count):
    with torch.device("meta"):
        m = UNet(PRESETS[preset])
    assert sum(p.numel() for p in m.parameters()) == count


@pytest.mark.parametrize("preset,gmacs,attn", [("sd-v1", 338.6, 63.0), ("bk-base", 223.7, 37.8),
                                               ("bk-small", 217.6, 37.8), ("bk-tiny", 205.0, 37.8)])
def test_macs_per_step(preset, gmacs, attn):
    with torch.device("meta"):
        m = UNet(PRESETS[preset])
    macs = unet.count_macs(m, latent=64, batch=1)
    conv_linear, attn_mm = sum(v[0] for v in macs.values()) / 1e9, sum(v[1] for v in macs.values()) / 1e9
    assert abs(conv_linear / gmacs - 1) < 0.005, conv_linear
    assert abs(attn_mm / attn - 1) < 0.005, attn_mm


def test_key_sets_follow_the_removal():
    keys = {k: set(UNet(narrow(c)).state_dict()) for k, c in PRESETS.items() if k != "tiny-test"}
    # base keeps pair 0 of every down stage and pairs 0, 1 of every up stage (BK copies teacher 0 and 2 into them)
    assert "down_blocks.0.resnets.1.conv1.weight" in keys["sd-v1"]
    assert not any(k.startswith(("down_blocks.0.resnets.1.", "up_blocks.1.resnets.2.")) for k in keys["bk-base"])
    assert "up_blocks.1.attentions.1.proj_out.weight" in keys["bk-base"]
    assert any(k.startswith("mid_block.") for k in keys["bk-base"])
    assert keys["bk-small"] == {k for k in keys["bk-base"] if not k.startswith("mid_block.")}
    assert not any(k.startswith(("down_blocks.3.", "up_blocks.3.", "mid_block.")) for k in keys["bk-tiny"])
    assert not any(k.startswith("down_blocks.2.downsamplers") for k in keys["bk-tiny"])
    assert "up_blocks.0.attentions.0.proj_in.weight" in keys["bk-tiny"]  # tiny's first up stage has attention


def test_summary_cli():
    out = subprocess.run([sys.executable, str(HERE / "unet.py"), "--preset", "bk-small", "--summary"],
                         capture_output=True, text=True, check=True).stdout
    assert "482,346,884 parameters (-43.9% vs reference)" in out
    assert "217.6G MACs" in out and "37.8G in attention" in out
    assert "mid_block" in out and "removed" in out

# -----------------------------------------------------------------------------
# unet.py: attention


def naive_attention(q, k, v, heads):
    B, Lq, D = q.shape
    q, k, v = (t.reshape(B, -1, heads, D // heads).transpose(1, 2).double() for t in (q, k, v))
    p = torch.softmax(q @ k.transpose(-1, -2) / (D // heads) ** 0.5, dim=-1)
    return (p @ v).transpose(1, 2).reshape(B, Lq, D)


@pytest.mark.parametrize("Lk", [77, 300])
@pytest.mark.parametrize("impl", ["sdpa", "tiled"])
def test_attention_matches_naive(impl, Lk):
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 300, 64), torch.randn(2, Lk, 64) * 3, torch.randn(2, Lk, 64)
    ref = naive_attention(q, k, v, heads=4)
    assert rel_err(attention(q, k, v, 4, impl).double(), ref) < 1e-5


def test_tiled_attention_with_ragged_tiles():
    # tile sizes that do not divide the lengths exercise the online-softmax rescaling across many tiles
    torch.manual_seed(1)
    q, k, v = torch.randn(1, 2, 37, 8), torch.randn(1, 2, 23, 8) * 5, torch.randn(1, 2, 23, 8)
    ref = torch.softmax(q.double() @ k.double().transpose(-1, -2) / 8 ** 0.5, -1) @ v.double()
    for x in (q, k, v):
        x.requires_grad_(True)
    out = tiled_attention(q, k, v, q_chunk=7, k_chunk=5)
    assert rel_err(out.double(), ref) < 1e-5
    # and it trains: gradients equal those of the plain formula
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    ref_out = torch.softmax(q @ k.transpose(-1, -2) / 8 ** 0.5, -1) @ v
    for a, b in zip(grads, torch.autograd.grad(ref_out, (q, k, v), g)):
        assert rel_err(a, b) < 1e-5


@pytest.mark.parametrize("impl", ["sdpa", "tiled"])
def test_attention_never_builds_the_full_matrix(impl):
    # 16,384 tokens: a 1024x1024 image's first U-Net stage. The N x N fp32 scores would take 1 GiB in
    # one allocation; the profiler sees every allocation, and a naive softmax(QK^T)V fails this test.
    from torch.profiler import ProfilerActivity, profile
    N = 16384
    q, k, v = (torch.randn(1, N, 8) for _ in range(3))
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = attention(q, k, v, 1, impl)
    largest = max(e.cpu_memory_usage for e in prof.events())
    assert out.shape == q.shape and largest < N * N * 4 / 64, f"an op allocated {largest / 2**20:.0f} MiB"

# -----------------------------------------------------------------------------
# unet.py: parity with diffusers


@pytest.mark.parametrize("preset", list(PRESETS))
def test_parity_every_preset_reduced_width(preset):
    check_parity(narrow(PRESETS[preset]))


def test_parity_tiled_attention_and_scalar_timesteps():
    cfg = replace(narrow(PRESETS["sd-v1"]), attention="tiled")
    check_parity(cfg, B=1, t=981)
    check_parity(cfg, B=2, t=torch.tensor(3.5))  # float and 0-d tensor timesteps


def test_parity_non_square_latent():
    check_parity(narrow(PRESETS["bk-small"]), B=1, H=16, W=40)


def test_parity_non_uniform_removal():
    # 2 pairs in the outer stages and 1 in the inner ones, a mid-block, no attention in stage 1
    cfg = replace(narrow(PRESETS["sd-v1"]), layers_per_block=(2, 1, 1, 2), cross_attn=(True, False, True, False))
    ours, _ = check_parity(cfg, B=3)
    assert len(ours.up_blocks[0].resnets) == 3 and len(ours.up_blocks[1].resnets) == 2


@pytest.mark.parametrize("preset", ["sd-v1", "bk-tiny"])
def test_parity_full_size(preset):
    check_parity(PRESETS[preset], B=2, H=8, W=8)


def test_linear_projection_and_upcast_sd2():
    # SD 2.x style: Linear proj_in/proj_out, per-stage head counts, fp32 attention
    cfg = replace(narrow(PRESETS["bk-base"]), use_linear_projection=True, upcast_attention=True,
                  num_heads=(1, 2, 4, 4))
    ours, _ = check_parity(cfg)
    assert ours.down_blocks[0].attentions[0].proj_in.weight.ndim == 2


def test_loads_a_diffusers_folder(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    from safetensors.torch import load_file
    cfg = narrow(PRESETS["bk-small"])
    torch.manual_seed(0)
    ref = diffusers.UNet2DConditionModel(**{k: v for k, v in cfg.to_diffusers().items() if k[0] != "_"})
    ref.save_pretrained(tmp_path)  # unet/config.json + diffusion_pytorch_model.safetensors, as published
    ours = UNet(UNetConfig.from_diffusers(json.loads((tmp_path / "config.json").read_text())))
    ours.load_state_dict(load_file(tmp_path / "diffusion_pytorch_model.safetensors"), strict=True)
    x, ctx = torch.randn(1, 4, 16, 16), torch.randn(1, 77, 32)
    with torch.no_grad():
        assert rel_err(ours(x, 500, ctx), ref(x, 500, ctx).sample) <= 1e-4

# -----------------------------------------------------------------------------
# unet.py: configs, training support, bad input

# the official nota-ai/bk-sdm-small unet/config.json, less the keys that equal diffusers' defaults
BK_SMALL_JSON = """{"_class_name": "UNet2DConditionModel", "_diffusers_version": "0.15.0.dev0",
 "act_fn": "silu", "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
 "center_input_sample": false, "cross_attention_dim": 768,
 "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
 "downsample_padding": 1, "dual_cross_attention": false, "flip_sin_to_cos": true, "freq_shift": 0,
 "in_channels": 4, "layers_per_block": 1, "mid_block_type": null, "norm_eps": 1e-05, "norm_num_groups": 32,
 "out_channels": 4, "sample_size": 64, "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D",
 "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"], "use_linear_projection": false}"""


def test_from_diffusers_reads_the_official_configs():
    d = json.loads(BK_SMALL_JSON)
    assert UNetConfig.from_diffusers(d) == PRESETS["bk-small"]
    tiny = dict(d, block_out_channels=[320, 640, 1280], down_block_types=d["down_block_types"][:3],
                up_block_types=d["up_block_types"][1:])
    assert UNetConfig.from_diffusers(tiny) == PRESETS["bk-tiny"]
    base = {k: v for k, v in d.items() if k != "mid_block_type"}  # the v2 base config omits the key
    assert UNetConfig.from_diffusers(base) == PRESETS["bk-base"]
    sd = dict(d, layers_per_block=2, mid_block_type="UNetMidBlock2DCrossAttn")
    assert UNetConfig.from_diffusers(sd) == PRESETS["sd-v1"]
    v2 = dict(sd, attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024, use_linear_projection=True)
    assert UNetConfig.from_diffusers(v2).num_heads == (5, 10, 20, 20)
    for cfg in PRESETS.values():
        assert UNetConfig.from_diffusers(cfg.to_diffusers()) == cfg
    with pytest.raises(ValueError, match="class_embed_type"):
        UNetConfig.from_diffusers(dict(d, class_embed_type="timestep"))


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    m = UNet(PRESETS["tiny-test"]).train()
    x, ctx, t = torch.randn(2, 4, 16, 16), torch.randn(2, 77, 32), torch.tensor([5, 900])
    grads = []
    for ckpt in (False, True):
        m.zero_grad()
        m.gradient_checkpointing = ckpt
        m(x, t, ctx).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
    assert grads[0].abs().max() > 0 and rel_err(grads[1], grads[0]) < 1e-5


def test_bad_input_is_a_clear_value_error():
    m = UNet(PRESETS["tiny-test"])
    x, ctx = torch.randn(1, 4, 16, 16), torch.randn(1, 77, 32)
    with pytest.raises(ValueError, match="latent must be"):
        m(torch.randn(1, 3, 16, 16), 1, ctx)
    with pytest.raises(ValueError, match="divisible by 8"):
        m(torch.randn(1, 4, 16, 12), 1, ctx)
    with pytest.raises(ValueError, match="context must be"):
        m(x, 1, torch.randn(1, 77, 768))
    with pytest.raises(ValueError, match="one timestep per sample"):
        m(x, torch.tensor([1, 2, 3]), ctx)
    with pytest.raises(ValueError, match="one entry per stage"):
        UNetConfig(layers_per_block=(1, 1, 1))
