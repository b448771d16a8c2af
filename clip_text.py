"""
The CLIP text encoder that conditions Stable Diffusion: a causal transformer over BPE tokens whose last
hidden state, (B, 77, 768) for SD v1, is the `context` the U-Net cross-attends to. Also its tokenizer.

References
1) Radford et al., "Learning Transferable Visual Models From Natural Language Supervision", arXiv 2103.00020:
   the text tower is a GPT-2-style pre-norm transformer with causal self-attention (section 2.4).
2) Numerical reference: transformers `CLIPTextModel` (models/clip/modeling_clip.py) and `CLIPTokenizer`
   (models/clip/tokenization_clip.py, transformers 5.23), which we reproduce with `tokenizers` primitives.
Checkpoint format: the official SD files' names, `text_model.encoder.layers.0.self_attn.q_proj.weight`.
state_dict() writes them; load_state_dict also takes transformers 5's unprefixed names and ignores the
`text_model.embeddings.position_ids` buffer of transformers-4 files. CompVis names go through convert_weights.py.
"""
import argparse
import gzip
import importlib.util
import json
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tokenizers import Regex, Tokenizer as HFTokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

# -----------------------------------------------------------------------------
# Config: field names are transformers' `CLIPTextConfig` names, so `transformers.CLIPTextConfig(**asdict(cfg))`
# builds the reference model and a text_encoder/config.json maps onto ours key by key.


@dataclass(frozen=True)
class CLIPTextConfig:
    vocab_size: int = 49408               # 256 bytes + 256 bytes+</w> + 48,894 merges + start + end
    max_position_embeddings: int = 77     # the context length CLIP was trained with
    hidden_size: int = 768                # SD v1: CLIP ViT-L/14's text width (= U-Net cross_attention_dim)
    num_hidden_layers: int = 12
    num_attention_heads: int = 12         # head size 64
    intermediate_size: int = 3072         # MLP width, 4 x hidden
    hidden_act: str = "quick_gelu"        # OpenAI CLIP's x * sigmoid(1.702 x); OpenCLIP (SD 2.x) uses exact GELU
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        if self.hidden_act not in ("quick_gelu", "gelu") or self.hidden_size % self.num_attention_heads:
            raise ValueError(f"need hidden_act 'quick_gelu' or 'gelu' and heads dividing the width: {self}")


SD_V1 = CLIPTextConfig()
PRESETS = {
    "sd-v1": SD_V1,  # 123,060,480 parameters
    # OpenCLIP ViT-H/14 as SD 2.x ships it: 24 layers trained, the last one dropped because SD 2.x
    # conditions on the penultimate layer (LDM's FrozenOpenCLIPEmbedder layer="penultimate"). 340,387,840.
    "sd-v2": replace(SD_V1, hidden_size=1024, num_hidden_layers=23, num_attention_heads=16,
                     intermediate_size=4096, hidden_act="gelu"),
    # width 32 = the U-Net tiny-test cross_attention_dim; the full vocabulary so the real tokenizer works
    "tiny-test": replace(SD_V1, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64),
    # toy.py's frozen random encoder, with a vocabulary learnt from its captions (at most 1024 tokens)
    "toy": replace(SD_V1, vocab_size=1024, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                   intermediate_size=256),
}

# -----------------------------------------------------------------------------
# Building blocks (bottom-up), each mirroring the transformers class it names


class CLIPAttention(nn.Module):
    """Causal multi-head self-attention: token i sees tokens 0..i only, as in a language model (causal=False: every
    token sees every other, as in CLIP's image tower, fid.py)."""

    def __init__(self, dim, heads, causal=True):
        super().__init__()
        self.heads, self.causal = heads, causal
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, L, D = x.shape
        q, k, v = (p(x).view(B, L, self.heads, D // self.heads).transpose(1, 2)  # (B, heads, L, d)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        # SDPA directly, not unet.attention(): that one has no causal mask, and this keeps the file
        # self-contained. The scale is the default 1/sqrt(d), as in CLIP.
        o = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.out_proj(o.transpose(1, 2).reshape(B, L, D))


class CLIPMLP(nn.Module):
    def __init__(self, dim, hidden, act):
        super().__init__()
        self.fc1, self.fc2, self.act = nn.Linear(dim, hidden), nn.Linear(hidden, dim), act

    def forward(self, x):
        h = self.fc1(x)
        # quick GELU is the sigmoid approximation OpenAI trained with; 1.702 makes it closest to erf-GELU
        h = h * torch.sigmoid(1.702 * h) if self.act == "quick_gelu" else F.gelu(h)
        return self.fc2(h)


class CLIPEncoderLayer(nn.Module):
    """Pre-norm transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, cfg, causal=True):
        super().__init__()
        self.self_attn = CLIPAttention(cfg.hidden_size, cfg.num_attention_heads, causal)
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


def normal(*shape):
    """N(0, 1), as nn.Embedding's own init draws it, except on the meta device (where convert_weights.py builds
    models to load), where there is nothing to draw: a draw there (randn, normal_) costs 0.3 s of first-call setup,
    and nn.Embedding's own imports torch._dynamo."""
    w = torch.empty(*shape)
    return w if w.is_meta else w.normal_()


class CLIPTextEmbeddings(nn.Module):
    """Token embedding plus a learned absolute position embedding."""

    def __init__(self, cfg):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size, _weight=normal(cfg.vocab_size,
                                                                                          cfg.hidden_size))
        self.position_embedding = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size,
                                               _weight=normal(cfg.max_position_embeddings, cfg.hidden_size))

    def forward(self, ids):
        # positions made on the fly instead of transformers' `position_ids` buffer: nothing to save or load
        return self.token_embedding(ids) + self.position_embedding(torch.arange(ids.shape[1], device=ids.device))


class CLIPTextTransformer(nn.Module):
    """Mirrors transformers `CLIPTextTransformer`: embeddings, encoder layers, final layer norm."""

    def __init__(self, cfg):
        super().__init__()
        self.embeddings = CLIPTextEmbeddings(cfg)
        self.encoder = nn.Module()  # a bare container: transformers' CLIPEncoder only adds `encoder.` to the names
        self.encoder.layers = nn.ModuleList([CLIPEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers)])
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

# -----------------------------------------------------------------------------
# The model


class CLIPTextModel(nn.Module):
    """ids (B, L <= 77) -> hidden states (B, L, hidden_size). Mirrors transformers `CLIPTextModel`, without the
    pooled output (SD never uses it)."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.cfg = cfg
        self.text_model = CLIPTextTransformer(cfg)  # the sub-module is what puts `text_model.` in the names
        self.register_load_state_dict_pre_hook(self._normalise_keys)

    @staticmethod
    def _normalise_keys(module, state_dict, prefix, *args):
        """Runs inside load_state_dict before keys are matched, on its private copy of the dict: drops the
        position_ids buffer of transformers-4 files and adds the `text_model.` prefix that transformers 5
        leaves out. The key check that follows stays strict: any other unknown or missing key still fails."""
        for key in [k for k in state_dict if k.startswith(prefix)]:
            name = key[len(prefix):]
            if name.endswith("embeddings.position_ids"):
                del state_dict[key]
            elif not name.startswith("text_model."):
                state_dict[prefix + "text_model." + name] = state_dict.pop(key)

    def forward(self, ids, layer=-1):
        """ids: (B, L) token ids. Returns final_layer_norm(h[layer]), where h is transformers'
        `hidden_states` tuple (h[0] = embeddings, h[i] = output of encoder layer i, n + 1 entries):
        layer=-1 (default) is `last_hidden_state`, what SD v1 conditions on. layer=-2 is "clip skip 2" in
        A1111 and `clip_skip=1` in diffusers pipelines: both take the penultimate h and apply the final layer
        norm, as we do. Layers after `layer` are not computed."""
        cfg, n = self.cfg, self.cfg.num_hidden_layers
        if ids.ndim != 2:
            raise ValueError(f"ids must be (batch, tokens), got shape {tuple(ids.shape)}")
        if ids.shape[1] > cfg.max_position_embeddings:
            raise ValueError(f"{ids.shape[1]} tokens, more than the model's {cfg.max_position_embeddings} positions")
        if ids.numel() and (ids.min() < 0 or ids.max() >= cfg.vocab_size):
            raise ValueError(f"token ids must lie in [0, {cfg.vocab_size}), got min {ids.min().item()}, "
                             f"max {ids.max().item()}: tokenizer and model vocabularies differ?")
        if not -(n + 1) <= layer <= n:
            raise ValueError(f"layer must index the {n + 1} hidden states (-{n + 1}..{n}), got {layer}")
        h = self.text_model.embeddings(ids)
        for block in self.text_model.encoder.layers[:layer % (n + 1)]:  # e.g. -1 -> all n layers, -2 -> n - 1
            h = block(h)
        return self.text_model.final_layer_norm(h)

# -----------------------------------------------------------------------------
# Tokenizer: byte-level BPE with an end-of-word suffix, built from `tokenizers` primitives exactly as
# transformers 5.23 builds `CLIPTokenizer`. OpenAI's own tokenizer also runs ftfy and html.unescape and
# strips; transformers does not, and it is what the SD pipelines use, so we follow it.


def bytes_to_unicode_symbols():
    """GPT-2's 256 byte symbols in vocabulary order: printable bytes stand for themselves, the other 68 bytes
    (controls, space, ...) are mapped to chr(256 + i) so that every symbol is a visible character."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(256 - len(printable))]


def openai_vocab(gz_path):
    """vocab and merges from OpenAI's bpe_simple_vocab_16e6.txt.gz (as in CLIP's simple_tokenizer.py)."""
    lines = gzip.open(gz_path, "rt", encoding="utf-8").read().split("\n")
    # line 0 is a header; CLIP uses the first 49152 - 256 - 2 = 48,894 merges, so that the vocabulary
    # (512 byte symbols + merges + 2 specials) is 49,408 entries
    merges = [tuple(m.split()) for m in lines[1:49152 - 256 - 2 + 1]]
    symbols = bytes_to_unicode_symbols()
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(vocab)}, merges


def clip_bpe(vocab, merges):
    """A `tokenizers.Tokenizer` set up like transformers' CLIPTokenizer.__init__."""
    tok = HFTokenizer(BPE(vocab, merges, continuing_subword_prefix="", end_of_word_suffix="</w>",
                          fuse_unk=False, unk_token="<|endoftext|>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                           normalizers.Lowercase()])
    # CLIP's word regex (specials, English clitics, letter runs, single digits, punctuation runs); whitespace is
    # dropped. Then bytes -> symbols; ByteLevel's own GPT-2 regex split stays on because transformers leaves it on.
    words = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(words), behavior="removed", invert=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|startoftext|>", "<|endoftext|>"])  # matched verbatim in text, as transformers does
    return tok


def find_openai_vocab():
    """bpe_simple_vocab_16e6.txt.gz from an installed `clip` (clip-anytorch) or `open_clip` package, found without
    importing it (their imports pull in torchvision), or None."""
    for spec in (importlib.util.find_spec(pkg) for pkg in ("clip", "open_clip")):
        path = Path(spec.origin).parent / "bpe_simple_vocab_16e6.txt.gz" if spec and spec.origin else None
        if path and path.exists():
            return path


class Tokenizer:
    """Text -> (B, 77) LongTensor: <|startoftext|>, the BPE ids (at most 75), <|endoftext|>, then padding.

    `path` is one of: an SD `tokenizer/` folder (vocab.json + merges.txt), a folder with only tokenizer.json as
    transformers 5 saves it, or OpenAI's bpe_simple_vocab_16e6.txt.gz. The pad token is read from the folder's
    tokenizer_config.json, then special_tokens_map.json (which wins, as in transformers); SD v1 pads with
    <|endoftext|> (also the default), SD 2.x with "!" (id 0). The model is causal, so the padding never changes
    the states of the real tokens, only of the padded positions, which the U-Net also attends to."""

    def __init__(self, path, max_length=77, bpe=None):
        path, pad, self.max_length = Path(path), "<|endoftext|>", max_length
        if bpe is not None:  # (vocab, merges) given directly: from_bpe()
            self.tok = clip_bpe(*bpe)
        elif path.name.endswith(".gz"):
            self.tok = clip_bpe(*openai_vocab(path))
        else:
            folder = path if path.is_dir() else path.parent
            if (folder / "vocab.json").exists() and (folder / "merges.txt").exists():
                self.tok = clip_bpe(*BPE.read_file(str(folder / "vocab.json"), str(folder / "merges.txt")))
            elif (folder / "tokenizer.json").exists():
                self.tok = HFTokenizer.from_file(str(folder / "tokenizer.json"))
                self.tok.no_truncation()  # we truncate and pad ourselves, below
                self.tok.no_padding()
            else:
                raise FileNotFoundError(f"{folder}: neither vocab.json + merges.txt nor tokenizer.json")
            for name in ("tokenizer_config.json", "special_tokens_map.json"):
                if (folder / name).exists():
                    p = json.loads((folder / name).read_text()).get("pad_token") or pad
                    pad = p["content"] if isinstance(p, dict) else p
        self.bos, self.eos, self.pad = (self.tok.token_to_id(t) for t in ("<|startoftext|>", "<|endoftext|>", pad))
        if None in (self.bos, self.eos, self.pad):
            raise ValueError(f"{path}: vocabulary lacks <|startoftext|>, <|endoftext|> or the pad token {pad!r}")

    @classmethod
    def from_bpe(cls, vocab, merges):
        """From a vocabulary dict and merge list in memory (sampler.py's byte-level toy tokenizer)."""
        return cls("<memory>", bpe=(vocab, merges))

    def save(self, folder):
        """Write the SD `tokenizer/` layout that transformers' CLIPTokenizer reads: vocab.json, merges.txt and
        tokenizer_config.json (the pad token and the 77-token context)."""
        Path(folder).mkdir(parents=True, exist_ok=True)
        self.tok.model.save(str(folder))
        config = dict(model_max_length=self.max_length, pad_token=self.tok.id_to_token(self.pad),
                      tokenizer_class="CLIPTokenizer")
        (Path(folder) / "tokenizer_config.json").write_text(json.dumps(config))

    def __call__(self, prompts):
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        keep = self.max_length - 2  # room for the start and end tokens
        rows = []
        # add_special_tokens=False: no post-processor; we add start/end here, identically for all three formats
        for text, enc in zip(prompts, self.tok.encode_batch(prompts, add_special_tokens=False)):
            ids = enc.ids
            if len(ids) > keep:
                dropped = text[enc.offsets[keep][0]:]  # offsets point into the original, un-normalised text
                warnings.warn(f"prompt longer than {keep} tokens was truncated; dropped: {dropped!r}", stacklevel=2)
                ids = ids[:keep]
            rows.append([self.bos, *ids, self.eos] + [self.pad] * (keep - len(ids)))
        return torch.tensor(rows, dtype=torch.long).reshape(len(rows), self.max_length)

# -----------------------------------------------------------------------------
# Command line:  python clip_text.py "a photo of a cat" [--vocab PATH] [--preset tiny-test --random-weights]


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("prompt")
    ap.add_argument("--vocab", help="tokenizer folder or bpe_simple_vocab_16e6.txt.gz (default: clip-anytorch's)")
    ap.add_argument("--preset", default="tiny-test", choices=list(PRESETS))
    ap.add_argument("--random-weights", action="store_true", help="also run the encoder with RANDOM weights")
    ap.add_argument("--layer", type=int, default=-1, help="-1: last hidden state, -2: 'clip skip 2'")
    args = ap.parse_args()
    vocab = args.vocab or find_openai_vocab()
    if vocab is None:
        ap.error("no vocabulary: pass --vocab, or `pip install --no-deps clip-anytorch` for the .gz")
    tokenizer = Tokenizer(vocab)
    ids = tokenizer(args.prompt)[0]
    n = ids.tolist().index(tokenizer.eos) + 1  # up to the end token, padding left out
    print("ids:", ids.tolist(), "\ntokens:", [tokenizer.tok.id_to_token(i) for i in ids[:n].tolist()])
    if args.random_weights:
        print(f"*** SMOKE RUN: {args.preset} text encoder with RANDOM weights; the states are noise ***")
        torch.manual_seed(0)
        with torch.no_grad():
            h = CLIPTextModel(PRESETS[args.preset]).eval()(ids[None], layer=args.layer)
        print(f"states {tuple(h.shape)}, mean {h.mean():.4f}, std {h.std():.4f}")
