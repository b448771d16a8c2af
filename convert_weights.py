"""
Load every Stable Diffusion v1 / BK-SDM checkpoint layout into our models, safely and without an fp32 detour;
write them back out as the original single file or as a diffusers folder; fetch a diffusers repo from the Hub.

References
1) CompVis/stable-diffusion `ldm/modules/diffusionmodules/openaimodel.py` and `ldm/models/autoencoder.py`:
   the LDM ("single file") names, `model.diffusion_model.input_blocks.4.1.proj_in.weight`.
2) diffusers 0.42 `loaders/single_file_utils.py` (convert_ldm_unet/vae/clip_checkpoint): the numerical oracle for
   our LDM -> diffusers direction (TestConvert in test_all.py); diffusers has no converter the other way.
3) gpt-fast: templated rename tables; meta-device construction + load_state_dict(assign=True) + mmap.
Checkpoint formats: ours is diffusers' / HF's naming (STYLE.md 5.3), so a diffusers folder needs no renaming.
The LDM names are mapped by the ordered (LDM, ours) rule tables below, run forwards to load and backwards to export.

Convention of load_state_dict_any(): one flat dict in our naming whose keys carry the component as a prefix,
"unet.", "vae." or "text_encoder." (the diffusers folder names), whatever the file held: a full single file gives
all three, a lone U-Net file only "unet.*". split_components() turns it into {component: state dict}.
Memory: models are built on the meta device and take the file's tensors as they are (assign=True): an fp32
safetensors file loads in fp32 without a copy (memory-mapped), a cast reads and converts one tensor at a time
(figures in BENCHMARKS.md).
Extension points (not done): SD 2.x OpenCLIP single files (`cond_stage_model.model.`), LoRA merging.
"""
import argparse
import json
import os
import pickle
import re
import shutil
import sys
import zipfile
from collections import Counter, defaultdict, namedtuple
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
import safetensors.torch

import clip_text
import unet as unet_mod
import vae as vae_mod
from clip_text import CLIPTextConfig, CLIPTextModel, Tokenizer
from unet import UNet, UNetConfig
from vae import AutoencoderKL, VAEConfig

DEFAULT_REPO = "nota-ai/bk-sdm-small"
COMPONENTS = ("unet", "vae", "text_encoder")
# the one table of dtype names, for every command line: torch's names, and the short ones of checkpoint files
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# a diffusers component folder's weights, by name: safetensors first, then the older pickle
WEIGHTS = {"text_encoder": ["model.safetensors", "pytorch_model.bin"],
           "unet": ["diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"],
           "vae": ["diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"]}
# STYLE.md appendix A; steps_offset=1 and set_alpha_to_one=False are what SD v1 was released with
SD_V1_SCHEDULER = dict(_class_name="PNDMScheduler", beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                       num_train_timesteps=1000, skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1,
                       clip_sample=False, prediction_type="epsilon", trained_betas=None)


def note(msg):
    print(f"convert_weights: {msg}", file=sys.stderr)

# -----------------------------------------------------------------------------
# Reading files safely: safetensors memory-mapped, pickles only through torch's weights_only unpickler

SAFETENSORS_DTYPE = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
CAST_CHUNK = 64 << 20  # bytes of cast tensors read through one opening of a file's memory map (read_file)


class LightningCheckpointStub:
    """Stand-in for `pytorch_lightning...ModelCheckpoint`, whose state some LDM-era .ckpt files pickle beside the
    weights. Allow-listing this inert class lets the weights_only unpickler fill it (dict update, no code runs)."""


def read_file(path, dtype=None):
    """One weights file -> (flat dict of CPU tensors, metadata dict), floating tensors cast to dtype if given."""
    path = Path(path)
    cast = lambda t: t.to(dtype) if dtype is not None and t.is_floating_point() else t
    if path.suffix == ".safetensors":
        try:
            with safe_open(path, framework="pt") as f:
                meta, keys = f.metadata() or {}, list(f.keys())
                stored = {f.get_slice(k).get_dtype() for k in keys}
                if dtype is None or stored <= {SAFETENSORS_DTYPE[dtype], "I64", "I32", "BOOL"}:
                    # no cast: memory-mapped tensors, whose pages are read when first touched and never copied
                    return {k: f.get_tensor(k) for k in keys}, meta
            # A cast converts each tensor from the memory map into a new one. A map keeps every page it has read in
            # this process's memory until it is closed (peak = file + result), so it is closed and opened again
            # after every CAST_CHUNK bytes of results: peak = result + a chunk of the file (BENCHMARKS.md, "Loading").
            out = {}
            while len(out) < len(keys):
                with safe_open(path, framework="pt") as f:
                    read = 0
                    for k in keys[len(out):]:
                        t = f.get_tensor(k)
                        out[k] = t.to(dtype, copy=True) if t.is_floating_point() else t.clone()  # none on the map
                        read += out[k].nbytes
                        if read >= CAST_CHUNK:
                            break
                    del t
            return out, meta
        except SafetensorError as e:
            raise ValueError(f"{path}: cannot read this safetensors file ({e}): truncated or corrupt?") from e
    try:  # mmap needs torch's zip format (torch >= 1.6); very old files are read whole
        with torch.serialization.safe_globals([(LightningCheckpointStub,
                                                "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint")]):
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        raise ValueError(f"{path}: refused to unpickle: it holds objects other than tensors, and loading it with "
                         f"weights_only=True stopped them from running ({str(e).splitlines()[0][:200]}). Only "
                         f"load it with weights_only=False if you trust its source; better, get a .safetensors "
                         f"file.") from e
    except Exception as e:
        raise ValueError(f"{path}: cannot read this checkpoint ({type(e).__name__}: {e}); truncated or corrupt?") from e
    sd = obj.get("state_dict", obj) if isinstance(obj, dict) else obj  # LDM/Lightning files nest the weights
    if not isinstance(sd, dict):
        raise ValueError(f"{path}: expected a dict of tensors, found {type(sd).__name__}")
    return {k: cast(v) for k, v in sd.items() if isinstance(v, torch.Tensor)}, {}

# -----------------------------------------------------------------------------
# Rename rules, LDM <-> ours. `{}` stands for a number; rules are tried in order and the first match renames
# the key's prefix. The same tables run backwards for export.

UNET_RULES = [("time_embed.0.", "time_embedding.linear_1."), ("time_embed.2.", "time_embedding.linear_2."),
              ("input_blocks.0.0.", "conv_in."), ("out.0.", "conv_norm_out."), ("out.2.", "conv_out.")]
RESNET_RULES = [("in_layers.0.", "norm1."), ("in_layers.2.", "conv1."), ("emb_layers.1.", "time_emb_proj."),
                ("out_layers.0.", "norm2."), ("out_layers.3.", "conv2."), ("skip_connection.", "conv_shortcut."),
                ("op.", "conv.")]  # the last one: LDM's Downsample calls its conv `op`
# what a numbered LDM sub-module (input_blocks.4.1) is, from the first part of its tensors' names
UNET_KIND = {"in_layers": "resnets", "out_layers": "resnets", "emb_layers": "resnets", "skip_connection": "resnets",
             "norm": "attentions", "proj_in": "attentions", "proj_out": "attentions",
             "transformer_blocks": "attentions", "op": "downsamplers", "conv": "upsamplers"}
VAE_RULES = [("encoder.down.{}.block.{}.", "encoder.down_blocks.{}.resnets.{}."),
             ("encoder.down.{}.downsample.", "encoder.down_blocks.{}.downsamplers.0."),
             ("decoder.up.{}.block.{}.", "decoder.up_blocks.{}.resnets.{}."),  # LDM's up.3 is our up_blocks.0:
             ("decoder.up.{}.upsample.", "decoder.up_blocks.{}.upsamplers.0.")]  # see flip_up() below
for side in ("encoder", "decoder"):
    VAE_RULES += [(f"{side}.mid.block_1.", f"{side}.mid_block.resnets.0."),
                  (f"{side}.mid.block_2.", f"{side}.mid_block.resnets.1."),
                  (f"{side}.mid.attn_1.norm.", f"{side}.mid_block.attentions.0.group_norm."),
                  *[(f"{side}.mid.attn_1.{a}.", f"{side}.mid_block.attentions.0.to_{a}.") for a in "qkv"],
                  (f"{side}.mid.attn_1.proj_out.", f"{side}.mid_block.attentions.0.to_out.0."),
                  (f"{side}.norm_out.", f"{side}.conv_norm_out.")]
VAE_LEAF_RULES = [(".nin_shortcut.", ".conv_shortcut.")]
# diffusers < 0.14 called the VAE attention's projections query/key/value/proj_attn
OLD_DIFFUSERS_VAE = [(f"{side}.mid_block.attentions.0.{a}.", f"{side}.mid_block.attentions.0.{b}.")
                     for side in ("encoder", "decoder")
                     for a, b in (("query", "to_q"), ("key", "to_k"), ("value", "to_v"), ("proj_attn", "to_out.0"))]


def rename(key, rules, reverse=False):
    """Apply the first matching (a, b) rule to the start of key (b -> a when reverse); returns key unchanged if none.
    Each `{}` in a template matches a number, which the other template receives in the same order."""
    for a, b in rules:
        src, dst = (b, a) if reverse else (a, b)
        m = re.match(re.escape(src).replace(r"\{\}", r"(\d+)"), key)
        if m:
            return dst.format(*m.groups()) + key[m.end():]
    return key


def n_children(sd, prefix):
    """How many numbered children `{prefix}{i}.` the keys of sd name: stages, resnets, layers."""
    return len({k[len(prefix):].split(".")[0] for k in sd if k.startswith(prefix)})


def unet_from_ldm(sd):
    """LDM U-Net keys (no `model.diffusion_model.` prefix) -> ours."""
    # LDM numbers its blocks flatly (input_blocks.N.M, N over all stages); ours are nested per stage. Files use two
    # numberings: the dense one of openaimodel.py (num_res_blocks=n: input_blocks.{(n+1)i+j+1}) and SD v1's with
    # gaps, which diffusers' export script writes for a BK model. So no index arithmetic: walk the blocks in index
    # order, recognise each sub-module by its names, and let a downsampler/upsampler close the current stage.
    out, groups = {}, defaultdict(lambda: defaultdict(dict))  # section -> (N, M) -> {name: tensor}
    for k, v in sd.items():
        m = re.match(r"(input_blocks|output_blocks)\.(\d+)\.(\d+)\.(.*)|middle_block\.(\d+)\.(.*)", k)
        if k.startswith("input_blocks.0.0.") or not m:  # conv_in and the other unnumbered modules
            out[rename(k, UNET_RULES)] = v
        elif m.group(1):
            groups[m.group(1)][(int(m.group(2)), int(m.group(3)))][m.group(4)] = v
        else:
            groups["middle_block"][(0, int(m.group(5)))][m.group(6)] = v
    for section, ours, ender in (("input_blocks", "down_blocks", "downsamplers"), ("middle_block", "mid_block", None),
                                 ("output_blocks", "up_blocks", "upsamplers")):
        stage, count = 0, Counter()
        for _, sub in sorted(groups[section].items()):
            first = next(iter(sub)).split(".")[0]
            kind = UNET_KIND.get(first, first)
            # an attention belongs to the resnet just before it; a resampler is always .0
            j = {"resnets": count["resnets"], "attentions": count["resnets"] - 1}.get(kind, 0)
            prefix = f"{ours}.{kind}.{j}." if section == "middle_block" else f"{ours}.{stage}.{kind}.{j}."
            for name, v in sub.items():
                out[prefix + (rename(name, RESNET_RULES) if kind in ("resnets", "downsamplers") else name)] = v
            count[kind] += 1
            if kind == ender:
                stage, count = stage + 1, Counter()
    return out


def unet_to_ldm(sd):
    """Ours -> LDM U-Net keys in the dense numbering LDM's openaimodel.py builds; derived from the keys alone."""
    # our numbered stage modules, sorted as LDM appends them: resnet j, its attention j, ..., the resampler last
    mods = {}  # prefix -> (sort key, kind)
    for k in sd:
        m = re.match(r"(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.", k)
        if m:
            section, i, kind, j = m.groups()
            j = 99 if "samplers" in kind else int(j)
            mods[m.group(0)] = (section == "up_blocks", int(i), j, kind == "attentions"), kind
    # A resnet or a downsampler opens the next LDM index; an attention or an upsampler joins the open one at the
    # next position (SD v1: output_blocks.2.1.conv is an upsampler after a resnet, .5.2.conv one after an attention)
    where = {"mid_block.resnets.0.": ("middle_block.0.", RESNET_RULES),  # our prefix -> (LDM prefix, rules below it)
             "mid_block.attentions.0.": ("middle_block.1.", []),
             "mid_block.resnets.1.": ("middle_block.2.", RESNET_RULES)}
    idx = {"down_blocks": 0, "up_blocks": -1}  # input_blocks.0 is conv_in
    for head, (_, kind) in sorted(mods.items(), key=lambda m: m[1]):
        section = head.split(".")[0]
        if kind in ("resnets", "downsamplers"):
            idx[section], pos = idx[section] + 1, 0
        else:
            pos += 1
        ldm = f"{'input' if section == 'down_blocks' else 'output'}_blocks.{idx[section]}.{pos}."
        where[head] = (ldm, RESNET_RULES if kind in ("resnets", "downsamplers") else [])  # conv -> op, in_layers...
    out = {}
    for k, v in sd.items():
        head = next((h for h in where if k.startswith(h)), None)
        if head is None:  # conv_in, time_embedding, conv_norm_out, conv_out
            out[rename(k, UNET_RULES, reverse=True)] = v
        else:
            ldm, rules = where[head]
            out[ldm + rename(k[len(head):], rules, reverse=True)] = v
    return out


def flip_up(key, n):
    """decoder.up(_blocks).i <-> .{n-1-i}. LDM's Decoder numbers its stages by resolution level, like the encoder
    (up.0 is full resolution and runs last); diffusers numbers them in the order they run."""
    m = re.match(r"decoder\.up(_blocks)?\.(\d+)\.", key)
    return key if not m else f"decoder.up{m.group(1) or ''}.{n - 1 - int(m.group(2))}." + key[m.end():]


def vae_from_ldm(sd):
    """LDM VAE keys -> ours (to_ours() then squeezes the 1x1-conv attention weights)."""
    n, out = n_children(sd, "encoder.down."), {}
    for k, v in sd.items():
        k = rename(flip_up(k, n), VAE_RULES)
        for a, b in VAE_LEAF_RULES:  # inside a resnet, wherever it sits
            k = k.replace(a, b)
        out[k] = v
    return out


def vae_to_ldm(sd):
    """Ours -> LDM VAE keys: the same tables backwards, and Linear attention weights back to 1x1 convs."""
    n, out = n_children(sd, "encoder.down_blocks."), {}
    for k, v in sd.items():
        if ".attentions.0.to_" in k and k.endswith("weight") and v.ndim == 2:
            v = v.reshape(*v.shape, 1, 1)  # LDM's AttnBlock uses 1x1 convs
        for a, b in VAE_LEAF_RULES:
            k = k.replace(b, a)
        out[flip_up(rename(k, VAE_RULES, reverse=True), n)] = v
    return out

# -----------------------------------------------------------------------------
# Format detection by key prefix (STYLE.md 5.5), and the one flat dict in our naming

# (prefix, component, layout): an LDM single file's three parts, then our own prefixes, below which the names may
# be in any layout; "ldm" layouts go through the rename rules above
PREFIXES = [("model.diffusion_model.", "unet", "ldm"), ("first_stage_model.", "vae", "ldm"),
            ("cond_stage_model.transformer.", "text_encoder", "hf"),
            ("unet.", "unet", None), ("vae.", "vae", None), ("text_encoder.", "text_encoder", None)]
# LDM training leftovers that are not weights of any of our models: the DDPM schedule buffers, EMA bookkeeping
LDM_EXTRAS = re.compile(r"^(betas|alphas_cumprod.*|sqrt_.*|log_one_minus.*|posterior_.*|logvar|model_ema\..*)$")


def detect(sd):
    """Which component and layout a prefix-free dict is, from its names; None if unrecognised."""
    if any(k.startswith(("input_blocks.", "time_embed.", "middle_block.")) for k in sd):
        return "unet", "ldm"
    if any(k.startswith(("conv_in.", "down_blocks.", "time_embedding.")) for k in sd):
        return "unet", "ours"
    if any(k.startswith(("encoder.down.", "decoder.up.", "encoder.mid.")) for k in sd):
        return "vae", "ldm"
    if any(k.startswith(("text_model.", "embeddings.token_embedding.")) for k in sd):
        return "text_encoder", "hf"  # before the VAE: transformers 5 writes `encoder.layers.` unprefixed
    if any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.", "quant_conv.")) for k in sd):
        return "vae", "ours"
    return None


def to_ours(component, layout, sd):
    """One component's prefix-free dict in the given layout -> our names and shapes."""
    if component == "unet" and layout == "ldm":
        return unet_from_ldm(sd)
    if component == "vae":
        sd = vae_from_ldm(sd) if layout == "ldm" else {rename(k, OLD_DIFFUSERS_VAE): v for k, v in sd.items()}
        # the mid attention's weights as Linear [C, C]: LDM (and some merged files) store 1x1 convs [C, C, 1, 1].
        # Biases are [C] in both layouts (diffusers#6226 was a converter that reshaped them too).
        return {k: v.reshape(v.shape[:2]) if ".attentions.0.to_" in k and v.ndim == 4 else v for k, v in sd.items()}
    if component == "text_encoder":  # HF names; make the transformers-5 form canonical, drop position_ids
        return {k if k.startswith("text_model.") else "text_model." + k: v for k, v in sd.items()
                if not k.endswith("position_ids")}
    return sd


def strip_wrappers(k):
    """`module.` (DataParallel) and `_orig_mod.` (torch.compile, nanoGPT#325), wherever they prefix a name part."""
    return re.sub(r"(^|\.)(module\.|_orig_mod\.)+", r"\1", k)


def from_checkpoint(sd, path="<dict>"):
    """A raw checkpoint dict -> our flat component-prefixed dict, using LDM's EMA U-Net weights when present."""
    sd = {strip_wrappers(k): v for k, v in sd.items()}
    # EMA weights are what LDM sampled with and what the "-ema" releases ship: prefer them. LDM's LitEma keeps each
    # copy as a buffer, and buffer names may not contain dots, so `model.diffusion_model.out.2.weight` has the twin
    # `model_ema.diffusion_modelout2weight`. Only a complete set of twins replaces the raw weights.
    ema = {k: "model_ema." + "".join(k.split(".")[1:]) for k in sd if k.startswith("model.diffusion_model.")}
    if ema and all(e in sd for e in ema.values()):
        note(f"{path}: using the EMA weights of the U-Net (model_ema.*), not the raw ones")
        sd.update({k: sd[e] for k, e in ema.items()})
    parts, rest = defaultdict(dict), {}
    for k, v in sd.items():
        hit = next(((p, c, lay) for p, c, lay in PREFIXES if k.startswith(p)), None)
        if hit:
            parts[hit[1], hit[2]][k[len(hit[0]):]] = v
        elif not LDM_EXTRAS.match(k):
            rest[k] = v
    # a single-component file has no prefixes (a diffusers unet/ file, a VAE-only .ckpt): name it from its keys
    if rest and not parts:
        found = detect(rest)
        if found is None:
            seen = sorted(Counter(".".join(k.split(".")[:2]) for k in rest).items())
            raise ValueError(f"{path}: unknown layout; key prefixes seen (count): {seen[:20]}. Expected a diffusers "
                             f"component (down_blocks., encoder.down_blocks., text_model.) or LDM names "
                             f"(model.diffusion_model., first_stage_model., cond_stage_model.transformer.)")
        parts[found], rest = rest, {}
    if rest:
        note(f"{path}: ignored {len(rest)} keys outside the U-Net, VAE and text encoder: "
             f"{sorted({k.split('.')[0] for k in rest})[:10]}")
    out = {}
    for (component, layout), part in parts.items():
        if layout is None:  # our own prefixes: the names below them may still be any layout
            layout = (detect(part) or (component, "ours"))[1]
        if component == "vae":  # LDM training files also keep the discriminator of the autoencoder's loss
            part = {k: v for k, v in part.items() if not k.startswith("loss.")}
        out.update({f"{component}.{k}": v for k, v in to_ours(component, layout, part).items()})
    return out


def split_components(sd):
    """{"unet": {...}, "vae": {...}, "text_encoder": {...}} from our flat prefixed dict (absent parts left out)."""
    out = defaultdict(dict)
    for k, v in sd.items():
        c, name = k.split(".", 1)
        out[c][name] = v
    return dict(out)


def weight_files(folder):
    """A diffusers component folder's weights: *.safetensors, else *.bin (all shards); a variant such as
    `.fp16.safetensors` only when it is the only file there."""
    for ext in (".safetensors", ".bin"):
        plain = sorted(p for p in folder.glob(f"*{ext}") if "." not in p.name[:-len(ext)])
        if plain:
            return plain
    variants = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    if len(variants) == 1:
        note(f"{folder}: using the only weights file there, the variant {variants[0].name}")
        return variants
    raise FileNotFoundError(f"{folder}: no weights file (*.safetensors or *.bin), or several variants: "
                            f"{[p.name for p in variants]}")


def is_diffusers_folder(path):
    return path.is_dir() and ((path / "model_index.json").exists() or (path / "unet").is_dir())


def load_state_dict_any(path, dtype=None):
    """Any weights file (or a diffusers folder) -> one flat dict in our naming, keys prefixed by component;
    floating tensors cast to dtype (one at a time) if given."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if is_diffusers_folder(path):
        sd = {}
        for c in COMPONENTS:
            if (path / c).is_dir():
                sd.update(load_state_dict_any(path / c, dtype))
        return sd
    files = weight_files(path) if path.is_dir() else [path]  # a folder here is one component's, e.g. unet/
    return from_checkpoint({k: v for f in files for k, v in read_file(f, dtype)[0].items()}, path)

# -----------------------------------------------------------------------------
# Configs: from config.json files, from file metadata, or inferred from shapes and matched to a preset; and back


def unet_config_from_keys(sd):
    """The U-Net architecture from our names and shapes. Heads cannot be seen in weights: 8 per stage (SD v1, BK)."""
    n = n_children(sd, "down_blocks.")
    # proj_in is a 1x1 conv in SD v1 and a Linear in SD 2.x; a U-Net without cross-attention gets SD v1's 768
    proj = next((v for k, v in sd.items() if k.endswith("proj_in.weight")), torch.empty(0, 0, 1, 1))
    ctx = next((v.shape[1] for k, v in sd.items() if k.endswith("attn2.to_k.weight")), 768)
    return UNetConfig(in_channels=sd["conv_in.weight"].shape[1], out_channels=sd["conv_out.weight"].shape[0],
                      block_out_channels=tuple(sd[f"down_blocks.{i}.resnets.0.conv1.weight"].shape[0]
                                               for i in range(n)),
                      layers_per_block=tuple(n_children(sd, f"down_blocks.{i}.resnets.") for i in range(n)),
                      cross_attn=tuple(n_children(sd, f"down_blocks.{i}.attentions.") > 0 for i in range(n)),
                      mid_block=any(k.startswith("mid_block.") for k in sd), num_heads=(8,) * n,
                      cross_attention_dim=ctx, use_linear_projection=proj.ndim == 2)


def vae_config_from_keys(sd):
    n = n_children(sd, "encoder.down_blocks.")
    return VAEConfig(in_channels=sd["encoder.conv_in.weight"].shape[1],
                     out_channels=sd["decoder.conv_out.weight"].shape[0],
                     latent_channels=sd["post_quant_conv.weight"].shape[0],
                     block_out_channels=tuple(sd[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"].shape[0]
                                              for i in range(n)),
                     layers_per_block=n_children(sd, "encoder.down_blocks.0.resnets."))


def text_config_from_keys(sd):
    emb, fc1 = sd["text_model.embeddings.token_embedding.weight"], sd["text_model.encoder.layers.0.mlp.fc1.weight"]
    return CLIPTextConfig(vocab_size=emb.shape[0], hidden_size=emb.shape[1], intermediate_size=fc1.shape[0],
                          max_position_embeddings=sd["text_model.embeddings.position_embedding.weight"].shape[0],
                          num_hidden_layers=n_children(sd, "text_model.encoder.layers."),
                          num_attention_heads=max(1, emb.shape[1] // 64))  # 64-wide heads, as in every CLIP


def vae_config_to_diffusers(cfg):
    """diffusers' AutoencoderKL config.json for cfg (UNetConfig.to_diffusers() is the U-Net's)."""
    n = len(cfg.block_out_channels)
    return dict(_class_name="AutoencoderKL", in_channels=cfg.in_channels, out_channels=cfg.out_channels,
                latent_channels=cfg.latent_channels, block_out_channels=list(cfg.block_out_channels),
                layers_per_block=cfg.layers_per_block, norm_num_groups=cfg.norm_num_groups,
                down_block_types=["DownEncoderBlock2D"] * n, up_block_types=["UpDecoderBlock2D"] * n,
                act_fn="silu", scaling_factor=cfg.scaling_factor, sample_size=512)  # SD v1's image size


def text_config_to_hf(cfg):
    """transformers' CLIPTextConfig config.json for cfg; the token ids are the ones CLIPTextConfig defaults to."""
    return dict(asdict(cfg), architectures=["CLIPTextModel"], model_type="clip_text_model",
                bos_token_id=49406, eos_token_id=49407, pad_token_id=1)


# Per component: config class, presets, inference from shapes, the config fields that shapes cannot show (a preset
# with the same visible fields supplies them), model class, config.json writer.
Kind = namedtuple("Kind", "config presets from_keys hidden model to_json")
KINDS = {"unet": Kind(UNetConfig, unet_mod.PRESETS, unet_config_from_keys,
                      ("num_heads", "norm_num_groups", "norm_eps", "flip_sin_to_cos", "freq_shift",
                       "upcast_attention", "sample_size", "attention"), UNet, UNetConfig.to_diffusers),
         "vae": Kind(VAEConfig, vae_mod.PRESETS, vae_config_from_keys,
                     ("norm_num_groups", "norm_eps", "scaling_factor", "attention"), AutoencoderKL,
                     vae_config_to_diffusers),
         "text_encoder": Kind(CLIPTextConfig, clip_text.PRESETS, text_config_from_keys,
                              ("num_attention_heads", "hidden_act", "layer_norm_eps"), CLIPTextModel,
                              text_config_to_hf)}


def config_from_dict(cls, d):
    """A config dataclass from a JSON dict: unknown fields dropped, lists back to tuples."""
    names = {f.name for f in fields(cls)}
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in names})


def config_metadata(cfgs):
    """Our exact configs (heads included) as safetensors metadata; read_configs() prefers them to inference."""
    return {"format": "pt", **{f"minisd_{c}_config": json.dumps(asdict(cfg)) for c, cfg in cfgs.items()}}


def infer_config(component, sd, path=""):
    """Inferred from the shapes; a preset with the same visible structure supplies what shapes cannot show."""
    kind = KINDS[component]
    cfg = kind.from_keys(sd)
    visible = lambda c: {k: v for k, v in asdict(c).items() if k not in kind.hidden}
    for name, preset in kind.presets.items():
        if visible(preset) == visible(cfg):
            note(f"{path}: {component} architecture inferred from the weights: preset {name}")
            return preset
    assumed = ", ".join(f"{h}={getattr(cfg, h)}" for h in kind.hidden[:2])
    note(f"{path}: {component} architecture inferred from the weights matches no preset (closest: "
         f"{closest_preset(component, sd)}); assumed {assumed}")
    return cfg


def meta_model(component, cfg):
    """Our model for cfg on the meta device: shapes, but no memory and no random init."""
    with torch.device("meta"):
        return KINDS[component].model(cfg)


def model_keys(component, cfg):
    """{name: shape} of our model for cfg (built on the meta device)."""
    return {k: tuple(v.shape) for k, v in meta_model(component, cfg).state_dict().items()}


def closest_preset(component, sd):
    """The preset whose (name, shape) set overlaps sd's most (Jaccard)."""
    have = {(k, tuple(v.shape)) for k, v in sd.items()}
    want = {n: set(model_keys(component, c).items()) for n, c in KINDS[component].presets.items()}
    return max(want, key=lambda n: len(have & want[n]) / len(have | want[n]))


def check_keys(component, cfg, sd, path=""):
    """strict=True's key check before loading, with an error a person can act on: missing and unexpected keys and
    wrong shapes grouped by prefix (3 levels), with counts, and the preset the file resembles most."""
    want = model_keys(component, cfg)
    missing, unexpected = sorted(set(want) - set(sd)), sorted(set(sd) - set(want))
    shapes = [f"{k}: file {tuple(sd[k].shape)} vs model {want[k]}" for k in sorted(set(want) & set(sd))
              if tuple(sd[k].shape) != want[k]]
    if missing or unexpected or shapes:
        name = next((f"preset {n!r}" for n, c in KINDS[component].presets.items() if c == cfg), repr(cfg))
        raise ValueError(f"{path}: the {component} weights do not fit the architecture {name}.\n"
                         f"  missing ({len(missing)}): {group(missing)}\n"
                         f"  unexpected ({len(unexpected)}): {group(unexpected)}\n"
                         f"  wrong shape ({len(shapes)}): {shapes[:5]}\n"
                         f"  the weights most resemble preset {closest_preset(component, sd)!r}")


def group(keys):
    """Key counts per module: names cut after an index in 3rd place or later (`down_blocks.0.resnets.1`,
    `mid_block.resnets.0`), else after 4 parts."""
    def head(k):
        parts = k.split(".")
        cut = next((i for i, p in enumerate(parts[:4]) if i >= 2 and p.isdigit()), 3)
        return ".".join(parts[:cut + 1])
    return dict(Counter(head(k) for k in keys))


def read_configs(path, parts, arch=None):
    """Each present component's config: its config.json in a diffusers folder (or in one model's folder, unet/),
    else --arch for the U-Net, else the configs our exports store in a file's metadata, else inferred from the
    shapes."""
    path, cfgs, meta = Path(path), {}, {}
    pipeline = is_diffusers_folder(path)
    file = weight_files(path)[0] if path.is_dir() and not pipeline else path
    if file.suffix == ".safetensors":  # the header again: load_state_dict_any() returns the tensors only
        with safe_open(file, framework="pt") as f:
            meta = f.metadata() or {}
    for c in parts:
        own = path / c / "config.json" if pipeline else path / "config.json"  # a file's: path/config.json is none
        if own.is_file() and (pipeline or len(parts) == 1):
            d = json.loads(own.read_text())
            # field names match diffusers' AutoencoderKL and transformers' CLIPTextConfig; absent ones default
            cfgs[c] = UNetConfig.from_diffusers(d) if c == "unet" else config_from_dict(KINDS[c].config, d)
        elif c == "unet" and arch:
            cfgs[c] = unet_mod.PRESETS[arch]
        elif f"minisd_{c}_config" in meta:
            cfgs[c] = config_from_dict(KINDS[c].config, json.loads(meta[f"minisd_{c}_config"]))
        else:
            cfgs[c] = infer_config(c, parts[c], path)
    return cfgs


def read_scheduler(path):
    """A diffusers folder's scheduler config, else the one to_single_file() stores in its metadata, else SD v1's PNDM
    config (an original single file carries none)."""
    path = Path(path)
    if (path / "scheduler" / "scheduler_config.json").is_file():
        return json.loads((path / "scheduler" / "scheduler_config.json").read_text())
    if path.suffix == ".safetensors":
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
        if "minisd_scheduler_config" in meta:
            return json.loads(meta["minisd_scheduler_config"])
    return dict(SD_V1_SCHEDULER)

# -----------------------------------------------------------------------------
# load_pipeline: meta-device models, tensors converted one at a time, assigned without a copy


@dataclass
class Pipeline:
    unet: UNet
    text_encoder: CLIPTextModel
    tokenizer: Tokenizer
    vae: AutoencoderKL
    unet_cfg: UNetConfig
    text_cfg: CLIPTextConfig
    vae_cfg: VAEConfig
    scheduler_config: dict   # scheduler/scheduler_config.json if present, else SD v1's PNDM config
    name: str                # what was loaded (its path), for PNG metadata

    def to(self, device, dtype):
        for m in (self.unet, self.text_encoder, self.vae):
            unet_mod.fast_layout(m.to(device, dtype))
        return self


def build(component, cfg, sd, dtype, device, path=""):
    """Our model for cfg holding sd's tensors, in eval() mode (sd is emptied)."""
    check_keys(component, cfg, sd, path)
    # On the meta device a model has shapes but no memory and no random init; assign=True then makes the file's
    # tensors its parameters, so a tensor already in dtype on device is used as it is, never copied.
    model = meta_model(component, cfg)
    tensors = {}
    for k in list(sd):  # popping each source as it is converted releases it: peak = the result + one source tensor
        v = sd.pop(k)
        v = v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype)
        tensors[k] = unet_mod.fast_layout(v) if v.dim() == 4 else v  # NHWC now, not by a second copy of the model
    model.load_state_dict(tensors, strict=True, assign=True)  # our models have no buffers outside the state dict
    return model.eval()


def find_tokenizer(path, width, tokenizer=None):
    """The tokenizer given, else a tokenizer/ folder in (or beside) path, else, as diffusers does for a single file,
    the one of SD's family for this text-encoder width from the Hugging Face cache, fetched on first use."""
    folder = path if path.is_dir() else path.parent
    for cand in (tokenizer, folder / "tokenizer"):
        if cand is not None and Path(cand).exists():
            return Tokenizer(cand)
    try:
        return hub_tokenizer(width)
    except OSError as e:
        raise OSError(f"{path}: no tokenizer/ folder beside it, and SD's tokenizer is not cached ({e}). Run once "
                      "with a network, or pass tokenizer=<a tokenizer/ folder> (--tokenizer here; sampler.py: put it "
                      "next to the file)") from None


def load_pipeline(path, dtype=torch.float32, device="cpu", arch=None, tokenizer=None):
    """A diffusers folder or a single-file checkpoint -> Pipeline, in dtype on device, models in eval() mode.
    arch: a unet.PRESETS name overriding the U-Net architecture of a single file."""
    path, dtype = Path(path), DTYPES[dtype] if isinstance(dtype, str) else dtype
    parts = split_components(load_state_dict_any(path, dtype))  # cast while reading: never two copies of a file
    missing = [c for c in COMPONENTS if c not in parts]
    if missing:
        raise ValueError(f"{path}: no {missing} weights in it (found: {sorted(parts)}); load_pipeline needs all "
                         f"three (load_state_dict_any reads single components)")
    cfgs = read_configs(path, parts, arch)
    tok = find_tokenizer(path, cfgs["text_encoder"].hidden_size, tokenizer)
    m = {c: build(c, cfgs[c], parts.pop(c), dtype, device, path) for c in COMPONENTS}
    return Pipeline(m["unet"], m["text_encoder"], tok, m["vae"], cfgs["unet"], cfgs["text_encoder"], cfgs["vae"],
                    read_scheduler(path), str(path))

# -----------------------------------------------------------------------------
# Export: the LDM single file, or a diffusers folder. safetensors, contiguous tensors, configs as metadata


def parts_and_configs(src, components, configs=None, path=""):
    """(state dicts, configs) per component from a Pipeline, or from a load_state_dict_any() dict plus configs
    (read_configs); configs not given are inferred from the shapes."""
    if isinstance(src, Pipeline):
        models = {"unet": (src.unet, src.unet_cfg), "vae": (src.vae, src.vae_cfg),
                  "text_encoder": (src.text_encoder, src.text_cfg)}
        return {c: models[c][0].state_dict() for c in components}, {c: models[c][1] for c in components}
    parts, configs = split_components(src), configs or {}
    missing = [c for c in components if c not in parts]
    if missing:
        raise ValueError(f"{path}: no {missing} weights to export (found {sorted(parts)})")
    cfgs = {c: configs.get(c) or infer_config(c, parts[c], path) for c in components}
    for c in components:  # never write a config that does not fit its weights: the error names the keys
        check_keys(c, cfgs[c], parts[c], path)
    return {c: parts[c] for c in components}, cfgs


def save_file(tensors, path, metadata=None):
    """safetensors' save_file, which writes a temporary file (mkstemp's, mode 0600) and renames it; then the mode any
    new file gets here (the umask's), so that others can read a model written for them."""
    safetensors.torch.save_file(tensors, path, metadata=metadata)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def prepare(t, dtype):
    t = t.to(dtype) if dtype is not None and t.is_floating_point() else t
    return t.contiguous()  # safetensors refuses views (sd.cpp's BK note)


def to_single_file(src, path, dtype=None, components=COMPONENTS, configs=None, scheduler_config=None):
    """Write the LDM single-file layout (model.diffusion_model., first_stage_model. with 1x1-conv attention,
    cond_stage_model.transformer.text_model.) as safetensors, our configs and a whole pipeline's scheduler config
    stored as metadata. src: a Pipeline or a load_state_dict_any() dict (then configs: {component: config}, else
    inferred)."""
    if Path(path).suffix != ".safetensors":  # a .ckpt name would make readers take it for a pickle
        raise ValueError(f"{path}: a single file is written as safetensors: name it .safetensors")
    parts, cfgs = parts_and_configs(src, components, configs, path)
    prefix = {c: p for p, c, layout in PREFIXES if layout}  # the LDM rows of PREFIXES
    to_ldm = {"unet": unet_to_ldm, "vae": vae_to_ldm, "text_encoder": dict}  # CLIP keeps HF's names in LDM files
    out = {}
    for c in components:
        out.update({prefix[c] + k: prepare(v, dtype) for k, v in to_ldm[c](parts[c]).items()})
    meta = config_metadata(cfgs)
    if set(components) == set(COMPONENTS):
        sched = (src.scheduler_config if isinstance(src, Pipeline) else scheduler_config) or SD_V1_SCHEDULER
        meta["minisd_scheduler_config"] = json.dumps(sched)
    save_file(out, str(path), metadata=meta)  # safetensors writes a temporary file and renames it


def to_diffusers(src, folder, dtype=None, components=COMPONENTS, configs=None, tokenizer=None, scheduler_config=None):
    """Write a diffusers folder (model_index.json, unet/, vae/, text_encoder/, scheduler/, and tokenizer/ from a
    Pipeline's tokenizer or the clip_text.Tokenizer given) that diffusers' from_pretrained loads. Each subfolder is
    written whole under a temporary name and renamed into place once all are: a failed export changes nothing."""
    folder = Path(folder)
    parts, cfgs = parts_and_configs(src, components, configs, folder)
    staged = lambda name: folder / f".{name}.tmp"
    for name in [*components, "scheduler", "tokenizer"]:
        shutil.rmtree(staged(name), ignore_errors=True)  # left by an export that failed
    for c in components:
        staged(c).mkdir(parents=True)
        (staged(c) / "config.json").write_text(json.dumps(KINDS[c].to_json(cfgs[c]), indent=2))
        save_file({k: prepare(v, dtype) for k, v in parts[c].items()}, str(staged(c) / WEIGHTS[c][0]),
                  metadata=config_metadata({c: cfgs[c]}))
    whole = set(components) == set(COMPONENTS)  # else some models, not a pipeline: no scheduler/, tokenizer/, index
    sched = (src.scheduler_config if isinstance(src, Pipeline) else scheduler_config) or SD_V1_SCHEDULER
    tok = src.tokenizer if isinstance(src, Pipeline) else tokenizer
    if whole:
        staged("scheduler").mkdir()
        (staged("scheduler") / "scheduler_config.json").write_text(json.dumps(sched, indent=2))
        if tok is not None:
            tok.save(staged("tokenizer"))
        else:
            note(f"{folder}: no tokenizer given: the diffusers folder gets no tokenizer/")
    for name in [*components, "scheduler", "tokenizer"]:  # all written: now only renames
        if staged(name).exists():
            old = folder / f".{name}.old"
            shutil.rmtree(old, ignore_errors=True)
            if (folder / name).exists():
                os.replace(folder / name, old)
            os.replace(staged(name), folder / name)
            shutil.rmtree(old, ignore_errors=True)
    if not whole:
        return
    index = dict(_class_name="StableDiffusionPipeline", unet=["diffusers", "UNet2DConditionModel"],
                 vae=["diffusers", "AutoencoderKL"], text_encoder=["transformers", "CLIPTextModel"],
                 tokenizer=["transformers", "CLIPTokenizer"] if tok else [None, None],
                 scheduler=["diffusers", sched.get("_class_name", "PNDMScheduler")],
                 safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False)
    (folder / ".model_index.json.tmp").write_text(json.dumps(index, indent=2))
    os.replace(folder / ".model_index.json.tmp", folder / "model_index.json")


# -----------------------------------------------------------------------------
# Fetching models with huggingface_hub into its shared cache (~/.cache/huggingface/hub, or HF_HUB_CACHE): a model
# fetched once with diffusers is found there and not fetched again; HF_TOKEN, HF_ENDPOINT (a mirror) and
# HF_HUB_OFFLINE work as for every Hugging Face library. Every failure is an OSError with one line that says what to do.

# What a pipeline needs: configs and tokenizer, then one full-precision weights file per model (WEIGHTS above):
# never the *.fp16.* / *.non_ema.* variants, safety_checker/, feature_extractor/ or the single-file .ckpt.
CONFIGS = ["model_index.json", "scheduler/scheduler_config.json", "tokenizer/*", *(f"{c}/config.json" for c in WEIGHTS)]
# SD's tokenizer per text-encoder width, as diffusers' single-file loader takes it (a single file carries none):
# SD v1's CLIP ViT-L/14, and SD 2.x's OpenCLIP ViT-H (which pads with "!")
TOKENIZERS = {768: ("openai/clip-vit-large-patch14", ""), 1024: ("stabilityai/stable-diffusion-2", "tokenizer/")}
TOKENIZER_FILES = ["vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json"]


def snapshot(repo_id, patterns, local_only=False):
    """huggingface_hub's snapshot_download of the files matching patterns; its errors in words."""
    from huggingface_hub import errors, snapshot_download  # imported here: loading local files needs no hub
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=local_only))
    except errors.GatedRepoError:
        raise PermissionError(f"{repo_id} is gated: accept its licence on https://huggingface.co/{repo_id} and set "
                              "HF_TOKEN to an access token (https://huggingface.co/settings/tokens)") from None
    except errors.HFValidationError:  # a mistyped path, say
        raise FileNotFoundError(f"{repo_id}: no such file or folder, and not a Hugging Face repo id") from None
    except (errors.RepositoryNotFoundError, errors.RevisionNotFoundError):
        raise FileNotFoundError(f"{repo_id} not found on the Hugging Face Hub (a private repo needs HF_TOKEN)") \
            from None
    except (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled, errors.HfHubHTTPError) as e:
        why = str(e).splitlines()[0]
        raise ConnectionError(f"{repo_id} is not in the Hugging Face cache and cannot be fetched ({why}): check the "
                              "network, or set HF_ENDPOINT to a mirror") from None


def is_complete(folder):
    """model_index.json plus config and weights for each model: what load_pipeline reads."""
    return (folder / "model_index.json").is_file() and all(
        (folder / c / "config.json").is_file() and any((folder / c / w).is_file() for w in names)
        for c, names in WEIGHTS.items())


def cached(repo_id):
    """The hub cache's complete copy of what a pipeline needs of repo_id, or None; never goes online."""
    try:
        return download(repo_id, local_only=True)
    except OSError:
        return None


def download(repo_id, local_only=False):
    """Fetch what a pipeline needs of repo_id (resumable, verified, cached) and return the snapshot folder."""
    folder = snapshot(repo_id, CONFIGS + [f"{c}/{names[0]}" for c, names in WEIGHTS.items()], local_only)
    pickles = [f"{c}/{names[1]}" for c, names in WEIGHTS.items() if not (folder / c / names[0]).is_file()]
    if pickles and (folder / "model_index.json").is_file():  # an older repo, without safetensors for some models
        folder = snapshot(repo_id, pickles, local_only)
    if not is_complete(folder):
        raise FileNotFoundError(f"{repo_id} is not a diffusers Stable Diffusion repo: it lacks model_index.json, or a "
                                f"config.json or weights file in {', '.join(WEIGHTS)}")
    return folder


def hub_tokenizer(width):
    """SD's tokenizer for a text encoder of this width, from the hub cache, fetched on first use."""
    repo, sub = TOKENIZERS.get(width, TOKENIZERS[768])
    return Tokenizer(snapshot(repo, [sub + f for f in TOKENIZER_FILES]) / sub)

# -----------------------------------------------------------------------------
# Command line:  python convert_weights.py sd-v1-4.ckpt --out unet.safetensors --component unet
#                python convert_weights.py download nota-ai/bk-sdm-small


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("input", help="a diffusers folder or a .safetensors/.ckpt/.pt/.bin file; or `download`")
    ap.add_argument("repo", nargs="?", default=DEFAULT_REPO, help="with `download`: the Hugging Face repo id")
    ap.add_argument("--out", help="output .safetensors file (single-file) or folder (diffusers)")
    ap.add_argument("--to", default="single-file", choices=["single-file", "diffusers"], help="output layout")
    ap.add_argument("--dtype", default=None, choices=list(DTYPES), help="cast floating tensors (None: keep)")
    ap.add_argument("--component", default="all", choices=["all", "unet", "vae", "text"], help="what to write")
    ap.add_argument("--arch", default=None, choices=list(unet_mod.PRESETS), help="U-Net preset of a single file")
    ap.add_argument("--tokenizer", default=None, help="tokenizer folder or vocab .gz for a diffusers output "
                                                      "(default: the one beside the input, else SD's from the hub)")
    args = ap.parse_args()
    try:
        if args.input == "download":
            print(download(args.repo))
            sys.exit(0)
        if not args.out:
            ap.error("--out is required")
        comps = {"all": COMPONENTS, "text": ("text_encoder",)}.get(args.component, (args.component,))
        src, dtype = Path(args.input), DTYPES[args.dtype] if args.dtype else None
        sd = load_state_dict_any(src, dtype)  # cast while reading: never the whole file in two dtypes
        cfgs = read_configs(src, {c: p for c, p in split_components(sd).items() if c in comps}, args.arch)
        if args.to == "diffusers":
            whole = comps == COMPONENTS  # a whole pipeline gets a tokenizer/ too
            tok = find_tokenizer(src, cfgs["text_encoder"].hidden_size, args.tokenizer) if whole else None
            to_diffusers(sd, args.out, dtype, comps, cfgs, tok, read_scheduler(src))
        else:
            to_single_file(sd, args.out, dtype, comps, cfgs, read_scheduler(src))
    except (ValueError, OSError, SafetensorError) as e:  # the messages are written for people (fetch: OSErrors)
        sys.exit(f"error: {e}")
    print(f"wrote {args.out} ({args.to}, {', '.join(comps)})")
