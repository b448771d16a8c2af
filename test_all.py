"""
The minisd test suite. Run:  python -m pytest -q test_all.py

Tier A (always): shapes, exact parameter and MAC counts, closed-form attention maths, tiling geometry,
error messages. Tier B (when the oracles from requirements-dev.txt are installed): numerical parity with
diffusers / transformers built from the same config and the same random weights, loaded with strict=True.
The CLIP vocabulary comes from the clip-anytorch wheel (pip install --no-deps clip-anytorch==2.6.0);
tests that need it skip without it.
"Relative error" below is max|ours - reference| / max|reference|, the standard's fp32 bound is 1e-4.
No test downloads anything: every model is built here with random weights.
"""
import copy
import json
import shutil
import subprocess
import sys
import warnings
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import clip_text
import unet
import vae
from clip_text import CLIPTextModel, Tokenizer, find_openai_vocab, openai_vocab
from unet import PRESETS, UNet, UNetConfig, attention, tiled_attention
from vae import AutoencoderKL, DiagonalGaussian

HERE = Path(__file__).parent


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def n_params(*modules):
    return sum(p.numel() for m in modules for p in m.parameters())


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
    assert n_params(m) == count


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


@pytest.mark.parametrize("impl", ["sdpa", "tiled"])
def test_low_precision_tracks_fp32(impl):
    # bf16 keeps 8 bits of mantissa, fp16 11: measured 1.5e-2 and 2e-3 on this model; bounds leave 2x room
    torch.manual_seed(0)
    m = UNet(replace(PRESETS["tiny-test"], attention=impl)).eval()
    x, ctx = torch.randn(2, 4, 32, 32), torch.randn(2, 77, 32)
    with torch.no_grad():
        ref = m(x, 10, ctx)
        for dtype, tol in ((torch.bfloat16, 3e-2), (torch.float16, 4e-3)):
            out = copy.deepcopy(m).to(dtype)(x.to(dtype), 10, ctx.to(dtype))  # a copy: casting back would
            assert out.dtype == dtype and rel_err(out.float(), ref) < tol      # leave rounded weights


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

# -----------------------------------------------------------------------------
# clip_text.py: fixtures

ASTRONAUT = "a photograph of an astronaut riding a horse"
ASTRONAUT_IDS = [49406, 320, 8853, 539, 550, 18376, 6765, 320, 4558, 49407]  # SD v1 tokenizer, see oracles.md
LONG = "a photo of a cat " * 15 + "and then a dog at the end"  # 75 tokens fill the 77 slots; the tail is dropped
PROMPTS = [
    "", ASTRONAUT, "A Photograph Of An ASTRONAUT", "hello, world!!! ...?  (really) [sic] {x} <y> #tag @user",
    "1234 and 3.14159 or 1,000,000", "café naïve résumé Ångström e\u0301 ﬁ", "emoji 🐈‍⬛ 🎉👍🏽 ❤️",
    "日本語のテキスト 中文 한국어", "  extra   spaces\tand\ttabs\nand\n\nnewlines  ",
    "it's the dog's toy, don't we're they've I'm you'll he'd IT'S", "an <|endoftext|> inside the text",
    "snake_case-and-kebab/slash\\back", LONG,
]


@pytest.fixture(scope="module")
def vocab_gz():
    path = find_openai_vocab()
    if path is None:
        pytest.skip("bpe_simple_vocab_16e6.txt.gz not found: pip install --no-deps clip-anytorch==2.6.0")
    return path


@pytest.fixture(scope="module")
def sd_dir(vocab_gz, tmp_path_factory):
    """An SD v1 style tokenizer folder: vocab.json + merges.txt, written from the gz file."""
    vocab, merges = openai_vocab(vocab_gz)
    d = tmp_path_factory.mktemp("sd_tokenizer")
    (d / "vocab.json").write_text(json.dumps(vocab))
    (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return d


@pytest.fixture(scope="module")
def hf_tok(sd_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.CLIPTokenizer.from_pretrained(str(sd_dir))


def reference_ids(hf_tok, prompts):
    return hf_tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids

# -----------------------------------------------------------------------------
# clip_text.py: tokenizer


def test_clip_vocabulary_from_gz(vocab_gz):
    vocab, merges = openai_vocab(vocab_gz)
    assert len(vocab) == 49408 and len(merges) == 48894
    assert vocab["!"] == 0 and vocab["a</w>"] == 320 and vocab["<|endoftext|>"] == 49407


def test_clip_tokenizer_matches_transformers(sd_dir, hf_tok):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = Tokenizer(sd_dir)(PROMPTS)
    ref = reference_ids(hf_tok, PROMPTS)
    assert ours.dtype == torch.long and ours.shape == (len(PROMPTS), 77)
    for prompt, a, b in zip(PROMPTS, ours.tolist(), ref.tolist()):
        assert a == b, f"{prompt!r}:\n ours {a}\n ref  {b}"
    assert ours[1, :10].tolist() == ASTRONAUT_IDS and (ours[1, 10:] == 49407).all()
    assert ours[0, :3].tolist() == [49406, 49407, 49407]  # the empty prompt: start, end, padding
    assert ours[-1, 76] == 49407 and (ours[-1] != 49407).sum() == 76  # truncated LONG still ends with the end token
    # exactly one warning, for LONG, naming what was dropped
    assert len(caught) == 1 and "'and then a dog at the end'" in str(caught[0].message)


def test_clip_tokenizer_formats_agree(vocab_gz, sd_dir, hf_tok, tmp_path):
    want = Tokenizer(sd_dir)(PROMPTS[:-1])
    assert torch.equal(Tokenizer(vocab_gz)(PROMPTS[:-1]), want)  # OpenAI's gz file directly
    hf_tok.save_pretrained(str(tmp_path / "t5"))                  # transformers 5 layout: tokenizer.json only
    for f in ("vocab.json", "merges.txt"):
        (tmp_path / "t5" / f).unlink(missing_ok=True)
    assert (tmp_path / "t5" / "tokenizer.json").exists()
    assert torch.equal(Tokenizer(tmp_path / "t5")(PROMPTS[:-1]), want)
    assert Tokenizer(vocab_gz)(ASTRONAUT)[0, :10].tolist() == ASTRONAUT_IDS  # a str gives a batch of one


def test_clip_tokenizer_sd2_padding(sd_dir, tmp_path):
    """SD 2.x's folder says pad_token "!" (id 0) in special_tokens_map.json, which overrides tokenizer_config."""
    transformers = pytest.importorskip("transformers")
    d = shutil.copytree(sd_dir, tmp_path / "sd2")
    (d / "tokenizer_config.json").write_text(json.dumps({"pad_token": "<|endoftext|>", "model_max_length": 77}))
    (d / "special_tokens_map.json").write_text(json.dumps({"pad_token": {"content": "!", "normalized": False}}))
    ours = Tokenizer(d)([ASTRONAUT, ""])
    assert ours[0, :10].tolist() == ASTRONAUT_IDS and (ours[0, 10:] == 0).all()
    assert torch.equal(ours, reference_ids(transformers.CLIPTokenizer.from_pretrained(str(d)), [ASTRONAUT, ""]))

# -----------------------------------------------------------------------------
# clip_text.py: text encoder


def test_clip_parameter_counts():
    with torch.device("meta"):
        assert n_params(CLIPTextModel(clip_text.PRESETS["sd-v1"])) == 123_060_480
        assert n_params(CLIPTextModel(clip_text.PRESETS["sd-v2"])) == 340_387_840


def clip_parity(cfg, ids, rel=1e-4):
    """Random transformers CLIPTextModel -> ours (strict, both key forms) -> compare outputs. Returns ours."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    ref = transformers.CLIPTextModel(transformers.CLIPTextConfig(**asdict(cfg))).eval()
    sd = ref.state_dict()
    assert not any(k.startswith("text_model.") for k in sd)  # transformers 5 drops the prefix
    # the official SD v1 form: prefixed, plus the position_ids buffer transformers 4 wrote
    official = {"text_model." + k: v for k, v in sd.items()}
    official["text_model.embeddings.position_ids"] = torch.arange(cfg.max_position_embeddings)[None]
    with torch.device("meta"):
        ours, ours2 = CLIPTextModel(cfg), CLIPTextModel(cfg)
    ours.load_state_dict(sd, strict=True, assign=True)
    ours2.load_state_dict(official, strict=True, assign=True)
    assert set(ours.state_dict()) == set(official) - {"text_model.embeddings.position_ids"}
    assert all(torch.equal(v, ours2.state_dict()[k]) for k, v in ours.state_dict().items())
    with torch.no_grad():
        out = ref(input_ids=ids, output_hidden_states=True)
        hs = out.hidden_states  # (embeddings, layer 1, ..., layer n), before the final layer norm
        ref_norm = ref.final_layer_norm  # transformers 5 flattened `text_model` away, as its key names show
        assert len(hs) == cfg.num_hidden_layers + 1
        got = {layer: ours.eval()(ids, layer=layer) for layer in (-1, -2, 0)}
        for layer, want in [(-1, out.last_hidden_state), (-2, ref_norm(hs[-2])), (0, ref_norm(hs[0]))]:
            err = ((got[layer] - want).abs().max() / want.abs().max()).item()
            assert err <= rel, f"layer {layer}: max relative error {err:.2e}"
        assert torch.allclose(ref_norm(hs[-1]), out.last_hidden_state, atol=1e-5)  # hs[-1] is before the norm
        assert not torch.allclose(got[-2], got[-1], atol=1e-2)  # clip skip does change the states
    return ours


def test_clip_parity_sd_v1_full_size(vocab_gz):
    ids = Tokenizer(vocab_gz)([ASTRONAUT, "A cat, 3 dogs & a 🐈 in Paris at 5pm!"])
    clip_parity(clip_text.PRESETS["sd-v1"], ids)


def test_clip_parity_tiny_and_sd_v2_reduced():
    ids = torch.randint(0, 49408, (2, 77), generator=torch.Generator().manual_seed(0))
    tiny = clip_parity(clip_text.PRESETS["tiny-test"], ids)
    assert tiny(ids).shape == (2, 77, 32)  # width 32 = the U-Net tiny-test cross_attention_dim
    clip_parity(clip_text.PRESETS["tiny-test"], ids[:, :10])  # a short sequence uses only the first 10 positions
    v2 = replace(clip_text.PRESETS["sd-v2"], hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=256)
    ours = clip_parity(v2, ids)
    # the activation is part of the parity: the same weights with quick GELU give other states
    with torch.device("meta"):
        quick = CLIPTextModel(replace(v2, hidden_act="quick_gelu"))
    quick.load_state_dict(ours.state_dict(), assign=True)
    with torch.no_grad():
        assert (quick(ids) - ours(ids)).abs().max() > 1e-3


def test_clip_bad_input():
    model = CLIPTextModel(clip_text.PRESETS["tiny-test"])
    ok = torch.zeros(1, 77, dtype=torch.long)
    for ids, msg in [(ok - 1, "token ids"), (ok + 49408, "token ids"), (torch.zeros(1, 78, dtype=torch.long), "78"),
                     (torch.zeros(77, dtype=torch.long), "batch")]:
        with pytest.raises(ValueError, match=msg):
            model(ids)
    with pytest.raises(ValueError, match="layer"):
        model(ok, layer=-4)  # tiny-test has 3 hidden states
    assert model(ok, layer=-3).shape == (1, 77, 32)
    with pytest.raises(RuntimeError, match="Unexpected key"):  # the key check stays strict after the pre-hook
        model.load_state_dict({**model.state_dict(), "text_model.extra.weight": torch.zeros(1)})

# -----------------------------------------------------------------------------
# vae.py: helpers


def diffusers_vae(cfg, sample_size=64):
    """diffusers' AutoencoderKL with the same architecture as cfg (its own random weights)."""
    diffusers = pytest.importorskip("diffusers")
    n = len(cfg.block_out_channels)
    return diffusers.AutoencoderKL(
        down_block_types=["DownEncoderBlock2D"] * n, up_block_types=["UpDecoderBlock2D"] * n,
        block_out_channels=list(cfg.block_out_channels), layers_per_block=cfg.layers_per_block,
        latent_channels=cfg.latent_channels, norm_num_groups=cfg.norm_num_groups, sample_size=sample_size).eval()


# -----------------------------------------------------------------------------
# vae.py: parity with diffusers


@pytest.mark.parametrize("preset", ["tiny-test", "sd-v1"])
def test_vae_parity_with_diffusers(preset):
    torch.manual_seed(0)
    cfg = vae.PRESETS[preset]
    ref = diffusers_vae(cfg)
    ours = AutoencoderKL(cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)  # same names, same shapes, nothing left over
    x = torch.rand(2, 3, 64, 64) * 2 - 1  # a 64x64 image -> 8x8 latent keeps full-size sd-v1 fast
    z = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        post, ref_post = ours.encode(x), ref.encode(x).latent_dist
        got = {"mean": (post.mean, ref_post.mean), "logvar": (post.logvar, ref_post.logvar),
               "decode": (ours.decode(z), ref.decode(z).sample),
               "sample": (post.sample(torch.Generator().manual_seed(7)),
                          ref_post.sample(generator=torch.Generator().manual_seed(7)))}
        if preset == "tiny-test":
            got["forward"] = (ours(x), ref(x).sample)
    for name, (a, b) in got.items():
        assert a.shape == b.shape, (name, a.shape, b.shape)
        err = rel_err(a, b)
        assert err <= 1e-4, f"{preset} {name}: relative error {err:.2e}"
    assert post.mean.shape == (2, 4, 8, 8) and got["decode"][0].shape == (2, 3, 64, 64)
    # the random weights give a non-degenerate posterior, so the checks above compare something
    assert post.logvar.std() > 1e-3 and (got["sample"][0] - post.mean).abs().max() > 1e-3
    assert cfg.scaling_factor == ref.config.scaling_factor == 0.18215  # exposed, but applied by neither model


def test_vae_tiled_attention_gives_the_same_model():
    torch.manual_seed(0)
    cfg = vae.PRESETS["tiny-test"]
    a, b = AutoencoderKL(cfg).eval(), AutoencoderKL(replace(cfg, attention="tiled")).eval()
    b.load_state_dict(a.state_dict(), strict=True)
    z = torch.randn(1, 4, 40, 36)  # 1440 tokens: more than one 1024-token tile of unet.tiled_attention
    with torch.no_grad():
        err = rel_err(b.decode(z), a.decode(z))
    assert err <= 1e-5, err


def test_vae_loads_a_diffusers_save_pretrained_folder(tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    torch.manual_seed(0)
    cfg = vae.PRESETS["tiny-test"]
    ref = diffusers_vae(cfg)
    ref.save_pretrained(tmp_path)
    ours = AutoencoderKL(cfg).eval()
    ours.load_state_dict(safetensors_torch.load_file(tmp_path / "diffusion_pytorch_model.safetensors"), strict=True)
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        assert rel_err(ours.decode(z), ref.decode(z).sample) <= 1e-4


def test_vae_posterior_clamps_logvar_and_samples_from_the_generator():
    moments = torch.cat([torch.zeros(1, 4, 2, 2), torch.tensor([-100.0, -1.0, 2.0, 100.0]).view(1, 4, 1, 1)
                         .expand(1, 4, 2, 2)], dim=1)
    post = DiagonalGaussian(moments)
    assert post.logvar[0, :, 0, 0].tolist() == [-30.0, -1.0, 2.0, 20.0]  # LDM's clamp to [-30, 20]
    eps = torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(post.sample(torch.Generator().manual_seed(3)), post.std * eps)
    torch.manual_seed(5)  # generator=None draws from the global CPU generator
    s1 = post.sample()
    torch.manual_seed(5)
    assert torch.equal(post.sample(), s1) and torch.equal(post.mode(), post.mean)

# -----------------------------------------------------------------------------
# vae.py: parameter counts (meta device: no memory, no init time)


def test_vae_parameter_counts_sd_v1():
    with torch.device("meta"):
        m = AutoencoderKL(vae.PRESETS["sd-v1"])
    assert n_params(m) == 83_653_863
    assert n_params(m.decoder, m.post_quant_conv) == 49_490_199
    assert n_params(m.decoder) == 49_490_179
    assert n_params(m.encoder, m.quant_conv) == 34_163_664

# -----------------------------------------------------------------------------
# vae.py: tiled decoding


class PointwiseDecoder(nn.Module):
    """A stand-in decoder with no spatial context (each latent pixel -> its own 8x8 block): tiling it must be
    exact, so any error in tile placement, coverage or weight normalisation shows up. Records its inputs."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, z):
        self.seen.append(tuple(z.shape[2:]))
        return F.interpolate(torch.tanh(z[:, :3]) + z[:, 3:] ** 2, scale_factor=8, mode="nearest")


def test_vae_tiled_decode_geometry_is_exact_and_tiles_are_bounded():
    torch.manual_seed(0)
    model = AutoencoderKL(vae.PRESETS["tiny-test"]).eval()
    model.decoder = PointwiseDecoder()
    z = torch.randn(2, 4, 37, 45)  # odd sides: 16-tiles with overlap 4 do not divide them evenly
    with torch.no_grad():
        full = model.decode(z)
        tiled = model.decode(z, tile_size=16, overlap=4)
    assert tiled.shape == full.shape == (2, 3, 296, 360)
    assert (tiled - full).abs().max() < 1e-5
    # ceil((37 - 4) / 12) = 3 rows x ceil((45 - 4) / 12) = 4 columns, every one a full 16x16 tile
    assert model.decoder.seen == [(37, 45)] + [(16, 16)] * 12


def test_vae_tile_weights_are_a_linear_crossfade():
    # n = 40, tile 16, overlap 4 -> starts 0, 12, 24: every overlap is exactly 4 latent = 8 image pixels (f = 2)
    tiles = list(vae.tiles_1d(40, 16, 4, 2, torch.zeros(())))
    assert [s for s, _ in tiles] == [0, 12, 24]
    total = torch.zeros(80)
    for s, w in tiles:
        total[2 * s:2 * s + len(w)] += w
    torch.testing.assert_close(total, torch.ones(80))  # the weights of overlapping tiles sum to one
    ramp = tiles[1][1][:8]  # tile 1 fades in linearly over the 8 pixels shared with tile 0
    torch.testing.assert_close(ramp, (torch.arange(8) + 0.5) / 8)
    assert tiles[0][1][0] == 1 and tiles[2][1][-1] == 1  # no fade at the image border
    assert [s for s, _ in vae.tiles_1d(10, 16, 4, 8, torch.zeros(()))] == [0]  # fits in one tile


def test_vae_tiled_decode_is_close_to_full_decode():
    """The stated tolerance (decode_tiled's docstring). With random weights the difference is dominated by the
    per-tile GroupNorm / attention statistics, not the seams: measured over seeds 0-5, mean |err| 0.21-0.30 and
    max 3.3-8.1 output stds (seed 0 here: 0.27 and 7.3), and a tile misplaced by one latent pixel or a blend with
    no ramp scores about the same (0.21-0.33). So these bounds only catch gross bugs: one 16-tile region left
    black scores 0.35, one decoded from the wrong place 0.39 (max 15.7). The two tests above check the blending
    exactly."""
    torch.manual_seed(0)
    model = AutoencoderKL(vae.PRESETS["tiny-test"]).eval()
    z = torch.randn(1, 4, 37, 45)
    with torch.no_grad():
        full = model.decode(z)
        tiled = model.decode(z, tile_size=16, overlap=4)
    err, std = (tiled - full).abs(), full.std()
    print(f"tiled vs full: mean {err.mean() / std:.3f} std, max {err.max() / std:.2f} std")
    assert err.mean() <= 0.30 * std and err.max() <= 10 * std
    assert model.decode(z, tile_size=64).equal(full)  # a latent that fits in one tile is not tiled


def test_vae_tiled_decode_tolerance_at_the_defaults():
    """The tolerance decode_tiled's docstring states for its defaults (64-tiles, overlap 16): measured mean
    0.034-0.050 and max 0.94-1.37 output stds over seeds 0-2 (seed 0: 0.042 and 1.37) on an 800x800 image."""
    torch.manual_seed(0)
    model = AutoencoderKL(vae.PRESETS["tiny-test"]).eval()
    z = torch.randn(1, 4, 100, 100)
    with torch.no_grad():
        full, tiled = model.decode(z), model.decode(z, tile_size=64)
    err, std = (tiled - full).abs(), full.std()
    assert err.mean() <= 0.06 * std and err.max() <= 2 * std, (err.mean() / std, err.max() / std)


def test_vae_tiled_decode_no_worse_than_diffusers():
    torch.manual_seed(0)
    cfg = vae.PRESETS["tiny-test"]
    ref = diffusers_vae(cfg, sample_size=128)  # diffusers tiles 128 px = 16 latent, overlap a quarter: 4
    ours = AutoencoderKL(cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    ref.enable_tiling()
    z = torch.randn(1, 4, 37, 45)
    with torch.no_grad():
        full = ours.decode(z)
        ours_err = (ours.decode(z, tile_size=16, overlap=4) - full).abs().mean()
        ref_err = (ref.decode(z).sample - full).abs().mean()
    assert ours_err <= ref_err, (ours_err, ref_err)

# -----------------------------------------------------------------------------
# vae.py: bad input and the command line


def test_vae_bad_input_is_a_clear_value_error():
    model = AutoencoderKL(vae.PRESETS["tiny-test"])
    with pytest.raises(ValueError, match="image must be"):
        model.encode(torch.zeros(1, 4, 64, 64))  # RGBA
    with pytest.raises(ValueError, match="image must be"):
        model.encode(torch.zeros(3, 64, 64))  # no batch dimension
    with pytest.raises(ValueError, match="multiples of 8"):
        model.encode(torch.zeros(1, 3, 64, 60))
    with pytest.raises(ValueError, match="latent must be"):
        model.decode(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="overlap"):
        model.decode(torch.zeros(1, 4, 40, 40), tile_size=16, overlap=16)
    # the factor is 2^(stages - 1): 4 for a 3-stage VAE, which accepts 36 but not 34
    three = AutoencoderKL(replace(vae.PRESETS["tiny-test"], block_out_channels=(8, 16, 32)))
    assert three.encode(torch.zeros(1, 3, 36, 36)).mean.shape == (1, 4, 9, 9)
    with pytest.raises(ValueError, match="multiples of 4"):
        three.encode(torch.zeros(1, 3, 34, 36))


def test_vae_cli_smoke_run_is_labelled():
    out = subprocess.run([sys.executable, "vae.py", "--preset", "tiny-test", "--random-weights", "--size", "64",
                          "--tile_size", "4"], cwd=HERE, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "RANDOM weights" in out.stdout and "334,383 parameters" in out.stdout
    assert "-> (1, 3, 64, 64)" in out.stdout
