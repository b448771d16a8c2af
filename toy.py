"""
The paper in miniature: BK-SDM reproduced end to end in a small world of coloured shapes, on a laptop CPU.

Every part is real and trained here by this project's own code: a KL autoencoder trained on the data, a frozen
random CLIP text encoder, a teacher U-Net with SD v1's topology at toy width trained from scratch by distill.py
(KD off, random initialisation: the plain diffusion loss), and BK-SDM's base, small and tiny students distilled
from it by distill.py exactly as the paper does. An attribute classifier trained on the data scores them: a "toy
CLIP score" (the share of images whose drawn attributes match their caption) and a "toy FID" (fid.py's Frechet
distance on the classifier's penultimate features). Then the paper's tables, in miniature: the architectures,
the KD ablation, and block importance (remove blocks of the teacher without retraining).

    python toy.py reproduce --out runs/toy          # everything (about 100 min on 2 cores); resumes where stopped
    python toy.py reproduce --quick --out /tmp/toy  # every stage in miniature (CI: checks that it runs, not quality)

References
1) Kim et al., "BK-SDM", arXiv 2305.15798: the removal rule, the KD losses, Tables 1-4 and the block study (Fig. 3).
2) Rombach et al., "High-Resolution Image Synthesis with Latent Diffusion Models", arXiv 2112.10752: the KL
   autoencoder's loss (reconstruction + a small KL weight; no perceptual or adversarial term here) and the
   latent scaling 1/std (sec. 4.3.2, `scale_by_std`).
3) Heusel et al., "GANs Trained by a Two Time-Scale Update Rule", arXiv 1706.08500: FID, here with other features.
Decisions: the text encoder is random and frozen (SD freezes CLIP too; a random causal transformer still gives
each caption its own states, which the U-Net's cross-attention learns to read); captions name left and right, so
no random flips; the teacher drops 10% of captions as SD was trained (classifier-free guidance needs it), the
students drop none (the paper's recipe).
"""
import argparse
import ast
import json
import os
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tokenizers import pre_tokenizers, trainers

import clip_text
import convert_weights
import distill
import fid
import sampler
import unet
import vae

# -----------------------------------------------------------------------------
# 1. The world: scenes (one or two shapes on a background), their drawings and their captions

SIZE = 64  # image side: the VAE (factor 8) makes an 8x8 latent, which the U-Net halves three times
SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (230, 40, 40), "green": (40, 190, 70), "blue": (50, 90, 240), "yellow": (240, 220, 40),
           "white": (245, 245, 245)}
BACKGROUNDS = {"black": (15, 15, 20), "gray": (125, 125, 125), "purple": (95, 40, 125)}
SIZES = {"small": 12, "large": 19}  # sides in pixels; a cell of the 3x3 grid is 21.3 px
CELLS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
WORDS = {  # paraphrases: each attribute has more than one name, chosen at random per caption
    "circle": ["circle", "disc"], "square": ["square", "box"], "triangle": ["triangle", "wedge"],
    "small": ["small", "little"], "large": ["large", "big"],
    "top left": ["top left", "upper left"], "top": ["top", "top middle"], "top right": ["top right", "upper right"],
    "left": ["left", "middle left"], "center": ["center", "middle"], "right": ["right", "middle right"],
    "bottom left": ["bottom left", "lower left"], "bottom": ["bottom", "bottom middle"],
    "bottom right": ["bottom right", "lower right"]}


@dataclass
class Scene:
    background: str
    objects: list        # [(shape, colour, size, cell)], cells distinct
    says_size: bool      # the caption names the sizes
    says_background: bool
    caption: str


def make_scene(seed, index):
    """Scene `index` of the stream `seed`: each one from its own generator, so any scene can be made alone."""
    g = np.random.default_rng([seed, index])
    pick = lambda options: options[g.integers(len(options))]  # noqa: E731
    cells = g.choice(len(CELLS), 1 + g.integers(2), replace=False)
    objects = [(pick(SHAPES), pick(list(COLOURS)), pick(list(SIZES)), CELLS[c]) for c in cells]
    bg, says_size, says_bg, form = pick(list(BACKGROUNDS)), g.random() < 0.8, g.random() < 0.5, g.integers(2)
    phrases = []
    for shape, colour, size, cell in objects:
        what = " ".join(([pick(WORDS[size])] if says_size else []) + [colour, pick(WORDS[shape])])
        phrases.append(f"a {what} in the {pick(WORDS[cell])}" if form == 0 else f"{pick(WORDS[cell])}: a {what}")
    caption = (" and " if form == 0 else ", ").join(phrases) + (f" on a {bg} background" if says_bg else "")
    return Scene(bg, objects, bool(says_size), bool(says_bg), caption)


def draw(scene, jitter_seed=None):
    """The scene as a (64, 64, 3) uint8 array: drawn at 4x and box-filtered down, so that edges are anti-aliased.
    Each object sits at its cell's centre, moved by up to 2 px (from jitter_seed)."""
    k, g = 4, np.random.default_rng(jitter_seed)
    im = Image.new("RGB", (SIZE * k, SIZE * k), BACKGROUNDS[scene.background])
    pen = ImageDraw.Draw(im)
    for shape, colour, size, cell in scene.objects:
        row, col = divmod(CELLS.index(cell), 3)
        cx, cy = ((np.array([col, row]) + 0.5) * SIZE / 3 + g.uniform(-2, 2, 2)) * k
        r = SIZES[size] * k / 2
        if shape == "circle":
            pen.ellipse([cx - r, cy - r, cx + r, cy + r], COLOURS[colour])
        elif shape == "square":
            pen.rectangle([cx - r, cy - r, cx + r, cy + r], COLOURS[colour])
        else:
            pen.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], COLOURS[colour])
    return np.asarray(im.resize((SIZE, SIZE), Image.BOX))


def write_data(folder, n, seed):
    """n training pairs as distill.py reads them: PNGs and a metadata.csv (file_name,text)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = ["file_name,text"]
    for i in range(n):
        scene = make_scene(seed, i)
        Image.fromarray(draw(scene, [seed, i])).save(folder / f"{i:06d}.png")
        rows.append(f'{i:06d}.png,"{scene.caption}"')
    (folder / "metadata.tmp").write_text("\n".join(rows) + "\n")
    os.replace(folder / "metadata.tmp", folder / "metadata.csv")


def images(scenes, seed):
    """Scenes -> (N, 3, 64, 64) float in [-1, 1], as the models take them."""
    x = np.stack([draw(s, [seed, i]) for i, s in enumerate(scenes)])
    return torch.from_numpy(x).permute(0, 3, 1, 2).float() / 127.5 - 1


def train_tokenizer(captions):
    """CLIP's tokenizer pipeline (clip_text.clip_bpe) with its BPE merges learnt from the captions by `tokenizers`'
    trainer: every word of this world becomes one token, as in CLIP's real vocabulary."""
    tok = clip_text.clip_bpe({"<|endoftext|>": 0}, [])
    tok.train_from_iterator(captions, trainers.BpeTrainer(
        vocab_size=TEXT.vocab_size, special_tokens=["<|startoftext|>", "<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), end_of_word_suffix="</w>"))
    vocab, merges = json.loads(tok.to_str())["model"]["vocab"], json.loads(tok.to_str())["model"]["merges"]
    # the two special tokens (ids 0, 1), the alphabet, then one token per merge. The trainer numbers the alphabet in
    # another order in each process (its hash maps): sorted, every run gets the same ids (the merges came out the
    # same in every process on this world's captions; the test checks it)
    alphabet = sorted(t for t, i in vocab.items() if 2 <= i < len(vocab) - len(merges))
    vocab |= {t: 2 + k for k, t in enumerate(alphabet)}
    return clip_text.Tokenizer.from_bpe(vocab, [tuple(m) if isinstance(m, list) else tuple(m.split()) for m in merges])

# -----------------------------------------------------------------------------
# 2. The models: the project's classes at toy width (presets "toy" in unet.py, vae.py and clip_text.py)

UNET, VAE, TEXT = unet.PRESETS["toy"], vae.PRESETS["toy"], clip_text.PRESETS["toy"]


def train_vae(scenes, seed, steps, batch, lr):
    """LDM's KL autoencoder objective without its perceptual and adversarial terms: reconstruction error summed over
    pixels + 1e-6 x KL(q(z|x) || N(0, I)) summed over latents (LDM's kl_weight), per image. The error is squared, not
    LDM's L1: without the perceptual term, L1 leaves the small shapes out for longer (PSNR 17.8 vs 20.3 dB after
    300 steps here). Then the latent scale: 1 / std of the latents, so that the diffusion model sees unit variance
    (LDM sec. 4.3.2)."""
    torch.manual_seed(seed)
    model, g = vae.AutoencoderKL(VAE).train(), torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr)
    for step in range(steps):
        idx = torch.randint(len(scenes), (batch,), generator=g).tolist()
        x = images([scenes[i] for i in idx], seed)
        post = model.encode(x)
        rec = model.decode(post.sample(g))
        kl = 0.5 * (post.mean ** 2 + post.std ** 2 - 1 - post.logvar).sum() / batch
        loss = (rec - x).pow(2).sum() / batch + 1e-6 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"vae step {step + 1}/{steps}: MSE {(rec - x).pow(2).mean().item():.4f}, KL {kl.item():.1f}")
    model.eval()
    with torch.no_grad():
        z = model.encode(images(scenes[:512], seed)).sample(g)
    model.cfg = replace(VAE, scaling_factor=round(1 / z.std().item(), 5))
    return model


class AttributeNet(nn.Module):
    """The judge: a small CNN that reads a scene back from its image: the background colour, and for each of the 9
    cells whether it holds an object and that object's shape, colour and size. Its 64 penultimate features are the
    toy FID's Inception."""
    HEADS = {"background": len(BACKGROUNDS), "occupied": len(CELLS), "shape": 9 * len(SHAPES),
             "colour": 9 * len(COLOURS), "size": 9 * len(SIZES)}

    def __init__(self, width=32, dims=64):
        super().__init__()
        layers, c = [], 3
        for c_out, stride in ((width, 1), (width, 2), (2 * width, 2), (2 * width, 2), (4 * width, 2)):
            layers += [nn.Conv2d(c, c_out, 3, stride, 1), nn.BatchNorm2d(c_out), nn.ReLU()]
            c = c_out
        self.features = nn.Sequential(*layers, nn.Flatten(), nn.Linear(c * 4 * 4, dims), nn.ReLU())  # 64 -> 4x4
        self.head = nn.Linear(dims, sum(self.HEADS.values()))

    def forward(self, x):
        out = self.head(self.features(x)).split(list(self.HEADS.values()), dim=1)
        return {k: v if k in ("background", "occupied") else v.unflatten(1, (9, -1)) for k, v in zip(self.HEADS, out)}


def targets(scenes):
    """The classifier's labels: background index, occupancy (9), and shape/colour/size per cell (-1: empty)."""
    t = {k: torch.full((len(scenes), 9), -1) for k in ("shape", "colour", "size")}
    t["background"] = torch.tensor([list(BACKGROUNDS).index(s.background) for s in scenes])
    t["occupied"] = torch.zeros(len(scenes), 9)
    for i, s in enumerate(scenes):
        for shape, colour, size, cell in s.objects:
            c = CELLS.index(cell)
            t["occupied"][i, c] = 1
            t["shape"][i, c], t["colour"][i, c] = SHAPES.index(shape), list(COLOURS).index(colour)
            t["size"][i, c] = list(SIZES).index(size)
    return t


def train_classifier(scenes, seed, steps, batch, lr, autoencoder):
    """Cross-entropy on every head (attributes only where a cell holds an object). Half of each batch is real
    images, half the same kind of scenes after the autoencoder (encoded and decoded): the judge reads what the
    VAE can draw (soft edges, shifted hues) as what it depicts, as CLIP reads a photo and a painting alike."""
    torch.manual_seed(seed)
    net, g = AttributeNet().train(), torch.Generator().manual_seed(seed)
    n = min(len(scenes), 4000)
    with torch.no_grad():  # a fixed pool of reconstructions, decoded once
        rec = torch.cat([autoencoder(images(scenes[i:i + 100], seed)).clamp(-1, 1) for i in range(0, n, 100)])
    opt = torch.optim.Adam(net.parameters(), lr)
    for step in range(steps):
        idx = torch.randint(len(scenes), (batch // 2,), generator=g).tolist()
        ridx = torch.randint(n, (batch // 2,), generator=g).tolist()
        batch_scenes = [scenes[i] for i in idx + ridx]
        out = net(torch.cat([images([scenes[i] for i in idx], seed), rec[ridx]]))
        t = targets(batch_scenes)
        loss = F.cross_entropy(out["background"], t["background"]) + \
            F.binary_cross_entropy_with_logits(out["occupied"], t["occupied"]) + \
            sum(F.cross_entropy(out[k].flatten(0, 1), t[k].flatten(), ignore_index=-1) for k in ("shape", "colour", "size"))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"classifier step {step + 1}/{steps}: loss {loss.item():.4f}")
    return net.eval()

# -----------------------------------------------------------------------------
# 3. The metrics: toy CLIP score (caption accuracy) and toy FID (fid.py on the classifier's features)


@torch.no_grad()
def read_scenes(net, x):
    """Images (N, 3, 64, 64) in [-1, 1] -> what the classifier sees: (background, {cell: (shape, colour, size)})."""
    out = net(x)
    bg, occ = out["background"].argmax(1), out["occupied"] > 0
    s, c, z = (out[k].argmax(2) for k in ("shape", "colour", "size"))
    return [(list(BACKGROUNDS)[bg[i]], {CELLS[j]: (SHAPES[s[i, j]], list(COLOURS)[c[i, j]], list(SIZES)[z[i, j]])
                                        for j in range(9) if occ[i, j]}) for i in range(len(x))]


def matches(seen, scene):
    """Does an image show what its caption says? The same occupied cells, and in each the caption's shape, colour
    and (if the caption names it) size; the background if the caption names it."""
    bg, objects = seen
    if set(objects) != {cell for *_, cell in scene.objects}:
        return False
    if scene.says_background and bg != scene.background:
        return False
    return all(objects[cell][:2] == (shape, colour) and (not scene.says_size or objects[cell][2] == size)
               for shape, colour, size, cell in scene.objects)


def uint8_to_model(batch):
    return torch.stack(list(batch)).float() / 127.5 - 1


def to_uint8(x):
    """[-1, 1] images -> uint8, as the sampler writes its images."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def scores(net, imgs, scenes, real_stats):
    """imgs uint8 (N, 3, 64, 64) for scenes -> toy accuracy (share matching their caption) and toy FID."""
    seen = [s for i in range(0, len(imgs), 250) for s in read_scenes(net, uint8_to_model(imgs[i:i + 250]))]
    acc = float(np.mean([matches(s, sc) for s, sc in zip(seen, scenes)]))
    mu, sigma = fid.compute_stats(list(imgs), extractor=lambda b: net.features(uint8_to_model(b)), progress=False)
    return dict(accuracy=acc, fid=fid.frechet_distance(mu, sigma, *real_stats))


def generate(pipe, scenes, seed, steps, guidance=7.5, batch=100):
    """One image per scene's caption; batch b draws from seed + b, the same for every model (the paper's protocol:
    25 PNDM steps, guidance 7.5). -> uint8 (N, 3, 64, 64)."""
    out = []
    for b in range(0, len(scenes), batch):
        r = sampler.txt2img(pipe, [s.caption for s in scenes[b:b + batch]], steps=steps, guidance=guidance,
                            generator=seed + b, progress=False)
        out.append(r.images.permute(0, 3, 1, 2))
    return torch.cat(out)

# -----------------------------------------------------------------------------
# 4. Block importance: a (resnet, attention) pair removed from the trained teacher, without retraining


def removable_pairs(cfg):
    """The teacher's pairs that can go without changing a shape: a pair whose input has its output's channels (a
    stage's first down pair widens, a stage's first up pair narrows: those stay). ("mid_block", None) is the whole
    mid-block; up pairs also drop the skip they would have consumed."""
    ch, n, pairs = cfg.block_out_channels, len(cfg.block_out_channels), []
    for i in range(n):
        pairs += [("down_blocks", i, j) for j in range(cfg.layers_per_block[i]) if j > 0 or ch[max(i - 1, 0)] == ch[i]]
    pairs.append(("mid_block", None, None))
    for k, i in enumerate(reversed(range(n))):  # up stage k mirrors down stage i
        pairs += [("up_blocks", k, j) for j in range(cfg.layers_per_block[i] + 1) if j > 0 or ch[min(i + 1, n - 1)] == ch[i]]
    return pairs


class removed:
    """with removed(model, pairs): each pair's resnet and attention pass their input through (forward hooks): an up
    resnet's input is [h, skip], of which h goes on."""

    def __init__(self, model, pairs):
        self.model, self.pairs, self.handles = model, pairs, []

    def __enter__(self):
        identity = lambda m, args, out: args[0][:, :out.shape[1]]  # noqa: E731
        for kind, k, j in self.pairs:
            if kind == "mid_block":
                self.handles.append(self.model.mid_block.register_forward_hook(identity))
                continue
            block = getattr(self.model, kind)[k]
            for m in [block.resnets[j]] + ([block.attentions[j]] if len(block.attentions) else []):
                self.handles.append(m.register_forward_hook(identity))
        return self.model

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def pair_name(pair):
    kind, k, j = pair
    return "mid-block" if kind == "mid_block" else f"{kind.split('_')[0]}{k}.{j}"

# -----------------------------------------------------------------------------
# 5. The reproduction: stages that keep their outputs, so that a rerun skips what is done


def log(msg):
    print(f"[toy {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@dataclass
class Plan:
    train: int = 20000          # training pairs
    val: int = 1000             # validation scenes: real statistics and generation prompts
    n_eval: int = 300           # images generated per model and seed
    n_blocks: int = 128         # images per block-removal variant
    vae_steps: int = 1500
    cls_steps: int = 1500
    teacher_steps: int = 10000
    student_steps: int = 500
    gen_steps: int = 25         # PNDM steps per image, the paper's
    batch: int = 32
    teacher_lr: float = 5e-4
    student_lr: float = 2e-4
    seed: int = 0


SEEDS = (0, 1)  # generation seeds per model
QUICK = Plan(train=96, val=32, n_eval=16, n_blocks=8, vae_steps=3, cls_steps=3, teacher_steps=3, student_steps=2,
             gen_steps=3, batch=8)
ABLATION = {  # name: distill.py flags, on base at a fixed number of steps; "base" itself is the full recipe
    "random init + task": ["--init", "random", "--lambdas", "1", "0", "0"],
    "teacher init + task": ["--lambdas", "1", "0", "0"],
    "+ output KD": ["--lambdas", "1", "1", "0"],
}


def ablation_slug(name):
    """"+ output KD" -> "ablation-outputKD": the run's folder name."""
    return "ablation-" + name.replace(" ", "").replace("+", "-").strip("-")


def machine(device):
    """Where a stage ran, for the time table: the GPU's name, or the CPU and its threads."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU, {torch.get_num_threads()} threads"


class Run:
    """The output folder, with stage(): a stage runs once; its seconds and machine are kept in times.json."""

    def __init__(self, out, plan, device):
        self.out, self.plan, self.device = Path(out), plan, torch.device(device)
        self.out.mkdir(parents=True, exist_ok=True)
        made = asdict(plan)  # a new run's
        if (self.out / "plan.json").exists():
            made = json.loads((self.out / "plan.json").read_text())
        elif (self.out / "times.json").exists():  # a run from before plan.json: its plan is on RESULTS.md's Plan line
            said = re.search(r"^Plan: (\{.*?\})\. ", (self.out / "RESULTS.md").read_text(), re.M) \
                if (self.out / "RESULTS.md").exists() else None
            made = ast.literal_eval(said.group(1)) if said else "unknown: no plan.json"
        if made != asdict(plan):  # its finished stages would be kept and reported under this plan
            raise SystemExit(f"error: {out} holds a run of another plan ({made}): use another --out")
        write_json(self.out / "plan.json", made)
        self.times = json.loads((self.out / "times.json").read_text()) if (self.out / "times.json").exists() else {}

    def stage(self, name, done, work, on=None):
        if not done.exists():
            log(f"stage {name}")
            t0 = time.time()
            try:
                work()
            finally:  # also when stopped (Ctrl-C, SIGTERM): a resumed stage adds up its parts
                seconds = self.times.get(name, {}).get("s", 0) + time.time() - t0
                self.times[name] = dict(s=seconds, on=machine(torch.device(on) if on else self.device))
                write_json(self.out / "times.json", self.times)


def write_json(path, obj):
    Path(f"{path}.tmp").write_text(json.dumps(obj, indent=1))
    os.replace(f"{path}.tmp", path)


def distill_run(run, name, teacher, steps, lr, *flags):
    """distill.py on the toy data, into run.out/runs/NAME; resumed from its newest checkpoint if it was cut."""
    folder = run.out / "runs" / name
    cache, shared = folder / "latent_cache", os.path.relpath(run.out / "latent_cache", folder)
    folder.mkdir(parents=True, exist_ok=True)
    (run.out / "latent_cache").mkdir(exist_ok=True)
    if cache.is_symlink() and os.readlink(cache) != shared:  # made before links were relative: it may point away
        cache.unlink()
    if not cache.exists():  # the same data, VAE and text encoder for every run: the captions and images encoded once
        os.symlink(shared, cache)  # relative: --out may be moved or copied (a copy's real folder is used as it is)
    argv = ["--teacher", str(teacher), "--data", str(run.out / "data"), "--out", str(folder), "--resolution",
            str(SIZE), "--cache-latents", "--no-flip", "--batch", str(run.plan.batch), "--grad-accum", "1",
            "--max-steps", str(steps), "--save-every", str(max(steps // 5, 1)), "--val-every", "0", "--lr", str(lr),
            "--gradient-checkpointing", "off", "--precision", "fp32", "--seed", str(run.plan.seed), *flags]
    argv += ["--device", "cpu"] if run.device.type == "cpu" else []
    if distill.checkpoints(folder):
        argv += ["--resume", str(folder)]
    distill.main(argv)
    if not (folder / "final").exists():  # distill.py saved a checkpoint and returned on a signal
        raise SystemExit(f"toy.py: the {name} run stopped before its last step; the same command resumes it")
    shutil.rmtree(run.out / name, ignore_errors=True)
    os.replace(folder / "final", run.out / name)


def reproduce(out, plan, device="cpu"):
    """Every stage, skipping those whose outputs exist. Training (distill.py) and generation run on `device`; the
    VAE, the classifier and the scores on the CPU; RESULTS.md's latencies are measured on the CPU."""
    run, o = Run(out, plan, device), Path(out)
    torch.manual_seed(plan.seed)
    train = [make_scene(plan.seed, i) for i in range(plan.train)]
    val = [make_scene(plan.seed + 1, i) for i in range(plan.val)]
    # the world and its judges
    run.stage("data", o / "data" / "metadata.csv", lambda: write_data(o / "data", plan.train, plan.seed), "cpu")
    run.stage("vae", o / "vae.safetensors", lambda: save_model(
        train_vae(train, plan.seed, plan.vae_steps, 16, 1e-3), o / "vae.safetensors"), "cpu")
    run.stage("classifier", o / "classifier.safetensors", lambda: save_model(
        train_classifier(train, plan.seed, plan.cls_steps, 64, 1e-3, load_vae(o / "vae.safetensors")),
        o / "classifier.safetensors"), "cpu")
    net = AttributeNet()
    net.load_state_dict(load_file(o / "classifier.safetensors"))
    net.eval()
    real_u8 = to_uint8(images(val, plan.seed + 1))
    real_stats = fid.compute_stats(list(real_u8), extractor=lambda b: net.features(uint8_to_model(b)), progress=False)
    # the teacher: SD v1's topology at toy width, trained from random weights with the plain diffusion loss
    run.stage("init", o / "init" / "model_index.json", lambda: write_init(o, train, plan.seed), "cpu")
    run.stage("teacher", o / "teacher" / "model_index.json", lambda: distill_run(
        run, "teacher", o / "init", plan.teacher_steps, plan.teacher_lr, "--student-config",
        str(o / "init" / "unet" / "config.json"), "--init", "random", "--lambdas", "1", "0", "0",
        "--drop-caption", "0.1"))
    # the students, as the paper makes them, and the KD ablation on base
    for arch in distill.ARCHS:
        run.stage(arch, o / arch / "model_index.json", lambda: distill_run(
            run, arch, o / "teacher", plan.student_steps, plan.student_lr, "--arch", arch))
    for name, flags in ABLATION.items():
        slug = ablation_slug(name)
        run.stage(slug, o / slug / "model_index.json", lambda: distill_run(
            run, slug, o / "teacher", plan.student_steps, plan.student_lr, "--arch", "base", *flags))
    # the scores
    results = json.loads((o / "scores.json").read_text()) if (o / "scores.json").exists() else {}
    # the ceilings: real images (accuracy on held-out ones, FID of training images against them), and real images
    # through the VAE, which is all that a latent diffusion model can draw
    real_train = to_uint8(images(train[:plan.val], plan.seed))
    results["real"] = dict(accuracy=[scores(net, real_u8, val, real_stats)["accuracy"]],
                           fid=[scores(net, real_train, train[:plan.val], real_stats)["fid"]])
    with torch.no_grad():
        v = load_vae(o / "vae.safetensors")
        rec = torch.cat([v(images(val[i:i + 100], plan.seed + 1)) for i in range(0, plan.val, 100)])
    rec_u8 = to_uint8(rec)
    results["vae"] = {k: [v] for k, v in scores(net, rec_u8, val, real_stats).items()}
    results["vae"]["psnr"] = [10 * np.log10(255 ** 2 / (rec_u8.float() - real_u8.float()).pow(2).mean().item())]
    log(f"ceilings: real {results['real']}, through the VAE {results['vae']}")
    evals = ["teacher", *distill.ARCHS, *map(ablation_slug, ABLATION)]
    for name in evals:  # every model draws the same captions from the same seeds; two seeds give a spread
        if name not in results:
            t0, pipe = time.time(), convert_weights.load_pipeline(o / name, device=device)
            runs = [scores(net, generate(pipe, val[:plan.n_eval], seed, plan.gen_steps), val[:plan.n_eval], real_stats)
                    for seed in SEEDS]
            results[name] = {k: [r[k] for r in runs] for k in runs[0]} | dict(seconds=time.time() - t0,
                                                                                on=machine(run.device))
            save_file({"images": generate(pipe, val[:8], plan.seed, plan.gen_steps)},
                      str(o / f"samples-{name}.safetensors"))
            write_json(o / "scores.json", results)
            log(f"{name}: {results[name]}")
    run.stage("blocks", o / "blocks.json", lambda: block_importance(o, val[:plan.n_blocks], net, real_stats, plan,
                                                                    device))
    write_results(o, val, results, run.times, plan)


def save_model(model, path):
    """A state dict in safetensors, with the model's config (if it has one) as JSON metadata."""
    meta = {"config": json.dumps(asdict(model.cfg))} if hasattr(model, "cfg") else None
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, f"{path}.tmp", metadata=meta)
    os.replace(f"{path}.tmp", path)


def load_vae(path):
    with safe_open(str(path), "pt") as f:
        cfg = json.loads(f.metadata()["config"])
    model = vae.AutoencoderKL(vae.VAEConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}))
    model.load_state_dict(load_file(path))
    return model.eval()


def write_init(o, train, seed):
    """The teacher-to-be as a diffusers folder: the trained VAE (with its latent scale), the random frozen text
    encoder, the tokenizer learnt from the training captions, and a random U-Net."""
    v = load_vae(o / "vae.safetensors")
    torch.manual_seed(seed)
    pipe = convert_weights.Pipeline(
        unet=unet.UNet(UNET), text_encoder=clip_text.CLIPTextModel(TEXT).eval(),
        tokenizer=train_tokenizer([s.caption for s in train]), vae=v, unet_cfg=UNET, text_cfg=TEXT,
        vae_cfg=v.cfg, scheduler_config=dict(convert_weights.SD_V1_SCHEDULER), name="toy")
    shutil.rmtree(o / "init.tmp", ignore_errors=True)
    convert_weights.to_diffusers(pipe, o / "init.tmp")
    os.replace(o / "init.tmp", o / "init")


@torch.no_grad()
def output_change(pipe, pairs, scenes, seed, arch=None):
    """Relative squared change of the teacher's eps on noised real latents when `pairs` are removed (or against
    the student init of `arch`): |eps' - eps|^2 / |eps|^2, over one fixed batch."""
    g, dev = torch.Generator().manual_seed(seed), next(pipe.unet.parameters()).device
    z = pipe.vae.encode(images(scenes, seed + 1).to(dev)).sample(g) * pipe.vae_cfg.scaling_factor
    ab = sampler.alphas_cumprod(sampler.SamplerConfig.from_diffusers(pipe.scheduler_config))
    t = torch.randint(0, 1000, (len(z),), generator=g)
    a = ab[t][:, None, None, None].to(dev)
    x_t = a.sqrt() * z + (1 - a).sqrt() * torch.randn(z.shape, generator=g).to(dev)
    t, ctx = t.to(dev), pipe.text_encoder(pipe.tokenizer([s.caption for s in scenes]).to(dev))
    eps = pipe.unet(x_t, t, ctx)
    if arch:
        eps2 = distill.build_student(pipe.unet, arch).eval()(x_t, t, ctx)
    else:
        with removed(pipe.unet, pairs):
            eps2 = pipe.unet(x_t, t, ctx)
    return ((eps2 - eps).pow(2).sum() / eps.pow(2).sum()).item()


def block_importance(o, scenes, net, real_stats, plan, device="cpu"):
    """Each removable pair alone; then sets of pairs: BK-SDM base's (the 2nd down pair and the middle up pair of
    every stage), the same number of the least important single pairs, and the students' real initialisations."""
    pipe = convert_weights.load_pipeline(o / "teacher", device=device)
    rows = {}

    def score(name, pairs=(), arch=None):
        t0 = time.time()
        if arch:
            scfg = distill.student_config(pipe.unet_cfg, arch)
            student = replace(pipe, unet=distill.build_student(pipe.unet, arch).eval(), unet_cfg=scfg)
            imgs = generate(student, scenes, plan.seed, plan.gen_steps)
        else:
            with removed(pipe.unet, pairs):
                imgs = generate(pipe, scenes, plan.seed, plan.gen_steps)
        rows[name] = dict(scores(net, imgs, scenes, real_stats), change=output_change(pipe, pairs, scenes[:64],
                                                                                      plan.seed, arch),
                          pairs=[pair_name(p) for p in pairs], seconds=time.time() - t0)
        log(f"blocks {name}: {rows[name]}")
    score("none")
    singles = removable_pairs(pipe.unet_cfg)
    for p in singles:
        score(pair_name(p), [p])
    n = len(pipe.unet_cfg.block_out_channels)
    bk = [("down_blocks", i, 1) for i in range(n)] + [("up_blocks", k, 1) for k in range(n)]
    score("BK-SDM base's pairs", bk)
    ranked = sorted((p for p in singles if p[0] != "mid_block"), key=lambda p: rows[pair_name(p)]["fid"])
    score(f"the {len(bk)} least important pairs", ranked[:len(bk)])
    for arch in distill.ARCHS:
        score(f"{arch} student's initialisation", arch=arch)
    write_json(o / "blocks.json", rows)

# -----------------------------------------------------------------------------
# 6. RESULTS.md: tables, image grids and the ablation's loss curves (drawn with pillow)


def grid(rows, labels, path, scale=1):
    """rows: {name: uint8 (K, 3, 64, 64)} -> one PNG, a row per model with its name on the left."""
    k, w = max(len(v) for v in rows.values()), 96
    im = Image.new("RGB", (w + k * SIZE * scale, len(rows) * SIZE * scale), "white")
    pen = ImageDraw.Draw(im)
    for r, (name, imgs) in enumerate(rows.items()):
        pen.text((4, r * SIZE * scale + SIZE * scale // 2 - 6), labels.get(name, name), fill="black")
        for c, x in enumerate(imgs):
            tile = Image.fromarray(x.permute(1, 2, 0).numpy()).resize((SIZE * scale,) * 2, Image.NEAREST)
            im.paste(tile, (w + c * SIZE * scale, r * SIZE * scale))
    im.save(path)


def loss_plot(curves, path, W=560, H=300):
    """{name: [task loss per step]} -> a line plot (a running mean over 50 steps), axes labelled, with a legend."""
    im = Image.new("RGB", (W, H), "white")
    pen, pad = ImageDraw.Draw(im), 40
    smooth = {k: np.convolve(v, np.ones(min(50, len(v))) / min(50, len(v)), "valid") for k, v in curves.items() if v}
    lo, hi = min(v.min() for v in smooth.values()), max(v.max() for v in smooth.values())
    hi = hi if hi > lo else lo + 1
    pen.rectangle([pad, 10, W - 10, H - pad], outline="black")
    pen.text((pad, H - pad + 8), "step ->", fill="black")
    pen.text((4, 10), f"{hi:.3f}", fill="black")
    pen.text((4, H - pad - 10), f"{lo:.3f}", fill="black")
    colours = ["#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e"]
    for c, (name, v) in enumerate(smooth.items()):
        xs = pad + np.arange(len(v)) / max(len(v) - 1, 1) * (W - 10 - pad)
        ys = H - pad - (v - lo) / (hi - lo) * (H - pad - 10)
        pen.line(list(zip(xs.tolist(), ys.tolist())), fill=colours[c % 5], width=2)
        pen.text((W - 200, 16 + 14 * c), f"-- {name}", fill=colours[c % 5])
    im.save(path)


def latency(pipe, steps, reps=5):
    """Median seconds of one U-Net step (the guided batch of 2) and of one whole image (`steps` PNDM steps + decode)."""
    x, ctx = torch.randn(2, 4, 8, 8), pipe.text_encoder(pipe.tokenizer(["", "a red circle in the center"]))
    step, image = [], []
    with torch.no_grad():
        for _ in range(reps):
            t0 = time.perf_counter()
            pipe.unet(x, torch.tensor(500), ctx)
            step.append(time.perf_counter() - t0)
        for _ in range(reps):
            t0 = time.perf_counter()
            sampler.txt2img(pipe, "a red circle in the center", steps=steps, generator=0, progress=False)
            image.append(time.perf_counter() - t0)
    return float(np.median(step)), float(np.median(image))


def mean_spread(values, fmt):
    """'m ± h': the mean and half the range over seeds (one value: just the value)."""
    m = fmt.format(float(np.mean(values)))
    return m if len(values) < 2 else f"{m} ± {fmt.format((max(values) - min(values)) / 2)}"


def write_results(o, val, results, times, plan):
    """RESULTS.md and results/*.png in the output folder (copy both into the repository to publish them)."""
    (o / "results").mkdir(exist_ok=True)
    names = {"teacher": "teacher (SD v1 topology)", "base": "BK-SDM-Base", "small": "BK-SDM-Small",
             "tiny": "BK-SDM-Tiny"}
    samples = {n: load_file(o / f"samples-{n}.safetensors")["images"] for n in names}
    real = to_uint8(images(val[:8], plan.seed + 1))
    grid({"real": real, **samples}, {"real": "real image", "teacher": "teacher", "base": "base", "small": "small",
                                     "tiny": "tiny"}, o / "results" / "toy-students.png", scale=2)
    abl = {n: ablation_slug(n) for n in ABLATION}
    grid({n: load_file(o / f"samples-{slug}.safetensors")["images"] for n, slug in abl.items()} |
         {"+ feature KD": samples["base"]}, {}, o / "results" / "toy-ablation.png", scale=2)
    curves = {}
    for n, slug in [*abl.items(), ("+ feature KD (full)", "base")]:
        log_file = o / "runs" / slug / "log.jsonl"
        curves[n] = [json.loads(ln)["task"] for ln in log_file.read_text().splitlines()] if log_file.exists() else []
    loss_plot(curves, o / "results" / "toy-ablation-loss.png")
    blocks = json.loads((o / "blocks.json").read_text())
    fmt = lambda r, k, f: mean_spread(r[k], f)  # noqa: E731
    L = ["# RESULTS: the paper in miniature", "",
         "Written by `python toy.py reproduce` (toy.py's docstring says what the world is and why). Every model below "
         "was trained by this project's code, on the machines that the time table at the end names; the numbers are "
         "what this run measured.", "",
         f"Plan: {asdict(plan)}. Generation: {plan.gen_steps} PNDM steps, guidance 7.5, {plan.n_eval} validation "
         f"captions per seed, seeds {list(SEEDS)} (values are mean ± half the range over the seeds). Toy accuracy: "
         "the share of images whose attributes, as the classifier reads them, match their caption; toy FID: "
         "fid.py's Frechet distance between the classifier's 64 penultimate features of the images and of "
         f"{plan.val} real validation images.", "",
         "## 1. Architecture (the paper's Table 1)", "",
         "| model | U-Net params | MACs / step | U-Net step (ms) | image (s) | toy FID | toy accuracy |",
         "|---|---:|---:|---:|---:|---:|---:|",
         f"| real images (the ceiling) | | | | | {fmt(results['real'], 'fid', '{:.2f}')} | "
         f"{fmt(results['real'], 'accuracy', '{:.3f}')} |",
         f"| real images through the VAE (PSNR {results['vae']['psnr'][0]:.1f} dB) | | | | | "
         f"{fmt(results['vae'], 'fid', '{:.2f}')} | {fmt(results['vae'], 'accuracy', '{:.3f}')} |"]
    reps = 1 if plan.gen_steps < 25 else 5
    for n, label in names.items():
        pipe = convert_weights.load_pipeline(o / n)
        macs = sum(sum(v) for v in unet.count_macs(pipe.unet, latent=SIZE // 8).values())
        step, image = latency(pipe, plan.gen_steps, reps)
        L.append(f"| {label} | {sum(p.numel() for p in pipe.unet.parameters()) / 1e6:.2f}M | {macs / 1e6:.1f}M | "
                 f"{step * 1e3:.1f} | {image:.2f} | {fmt(results[n], 'fid', '{:.2f}')} | "
                 f"{fmt(results[n], 'accuracy', '{:.3f}')} |")
    L += ["", f"Latency: medians of {reps} run(s) on this CPU, one process, after the training; the step is the "
          f"guided batch of 2 at an 8x8 latent; the image is {plan.gen_steps} steps and the VAE decode.", "",
          "![teacher and students](results/toy-students.png)", "",
          "Same captions (the first 8 validation scenes, listed below) and seed for every row.", ""]
    L += [f"{i + 1}. {s.caption}" for i, s in enumerate(val[:8])]
    L += ["", f"## 2. The KD ablation (the paper's Table 4), on base, {plan.student_steps} steps each", "",
          "| recipe | toy FID | toy accuracy | final task loss (mean of the last 50 steps) |", "|---|---:|---:|---:|"]
    for n, slug in [*abl.items(), ("+ feature KD (the paper's recipe)", "base")]:
        c = curves.get(n) or curves["+ feature KD (full)"]
        L.append(f"| {n} | {fmt(results[slug], 'fid', '{:.2f}')} | {fmt(results[slug], 'accuracy', '{:.3f}')} | "
                 f"{np.mean(c[-50:]):.4f} |")
    L += ["", "![ablation samples](results/toy-ablation.png)", "",
          "![task loss during distillation](results/toy-ablation-loss.png)", "",
          "## 3. Block importance (the paper's Fig. 3): pairs removed from the trained teacher, no retraining", "",
          f"Each pair's resnet and attention pass their input through; {plan.n_blocks} images per row, seed "
          f"{plan.seed}. Output change: |eps' - eps|^2 / |eps|^2 on noised real latents.", "",
          "| removed | output change | toy FID | toy accuracy |", "|---|---:|---:|---:|"]
    for n, r in sorted(blocks.items(), key=lambda kv: kv[1]["fid"]):
        L.append(f"| {n} | {r['change']:.4f} | {r['fid']:.2f} | {r['accuracy']:.3f} |")
    L += ["", "Pairs are named by stage and position: down0 is the outermost down stage, up0 the innermost up stage.",
          "", "## What the numbers say, against the paper's claims", ""] + verdicts(results, blocks, abl)
    L += ["", "## Time per stage", "", "| stage | s | ran on |", "|---|---:|---|"]
    L += [f"| {k} | {v['s']:.0f} | {v['on']} |" for k, v in times.items()]
    L += [f"| evaluation of {n} | {r['seconds']:.0f} | {r['on']} |" for n, r in results.items() if "seconds" in r]
    (o / "RESULTS.tmp").write_text("\n".join(L) + "\n")
    os.replace(o / "RESULTS.tmp", o / "RESULTS.md")
    log(f"wrote {o / 'RESULTS.md'}")


def verdicts(results, blocks, abl):
    """The paper's claims, each checked against this run's numbers (mean toy FID over the seeds; lower is better)."""
    fd = {k: float(np.mean(v["fid"])) for k, v in results.items()}
    acc = {k: float(np.mean(v["accuracy"])) for k, v in results.items()}
    said = lambda ok: "holds here" if ok else "does NOT hold here"  # noqa: E731
    rnd, tsk, out = (abl[n] for n in ABLATION)
    singles = {k: r for k, r in blocks.items() if r["pairs"] and len(r["pairs"]) == 1}
    median = float(np.median([r["fid"] for r in singles.values()]))
    least = next(k for k in blocks if k.startswith("the "))
    bk = blocks["BK-SDM base's pairs"]["fid"]
    order = sorted(singles, key=lambda k: singles[k]["fid"])
    return [
        f"- Students are close to their teacher (Table 1): toy FID teacher {fd['teacher']:.2f}, base {fd['base']:.2f}, "
        f"small {fd['small']:.2f}, tiny {fd['tiny']:.2f}; accuracy {acc['teacher']:.3f} / {acc['base']:.3f} / "
        f"{acc['small']:.3f} / {acc['tiny']:.3f}.",
        f"- Teacher initialisation is essential (ablation): random init + task loss {fd[rnd]:.2f} vs teacher init "
        f"{fd[tsk]:.2f}: {said(fd[tsk] < fd[rnd])}.",
        f"- Output KD helps over the task loss alone: {fd[tsk]:.2f} -> {fd[out]:.2f}: {said(fd[out] < fd[tsk])}; feature "
        f"KD helps further (the full recipe is best): {fd[out]:.2f} -> {fd['base']:.2f}: "
        f"{said(fd['base'] <= min(fd[rnd], fd[tsk], fd[out]))}.",
        f"- Removing the mid-block alone changes little (within 1% of the toy FID): {blocks['mid-block']['fid']:.2f} "
        f"against {blocks['none']['fid']:.2f} with nothing removed (median single pair: {median:.2f}): "
        f"{said(abs(blocks['mid-block']['fid'] - blocks['none']['fid']) <= 0.01 * blocks['none']['fid'])}.",
        f"- BK-SDM's choice of pairs is the best one: without retraining, base's set scores "
        f"{bk:.2f} and the same number of the least important single pairs "
        f"({', '.join(blocks[least]['pairs'])}) {blocks[least]['fid']:.2f}: "
        f"{said(bk <= blocks[least]['fid'])}. The least important single pairs "
        f"here: {', '.join(order[:4])}; the most important: {', '.join(order[-3:])}.",
    ]


def publish(o, to):
    """RESULTS.md and its images into `to` (the repository), and the teacher as an fp16 diffusers folder `to`/toy,
    so that `python sampler.py "a big red circle in the center" --weights toy` draws with no network."""
    to = Path(to)
    if not (o / "RESULTS.md").is_file():
        raise SystemExit(f"error: {o} holds no finished run (no RESULTS.md): python toy.py reproduce --out {o}")
    quick = json.loads((o / "plan.json").read_text()) == asdict(QUICK) if (o / "plan.json").exists() else False
    if quick and to.resolve() == Path(__file__).parent.resolve():  # its models are barely trained
        raise SystemExit(f"error: {o} is a --quick run: it is not published into the repository (--to elsewhere)")
    shutil.copytree(o / "results", to / "results", dirs_exist_ok=True)
    shutil.copy(o / "RESULTS.md", to / "RESULTS.tmp")
    os.replace(to / "RESULTS.tmp", to / "RESULTS.md")
    pipe = convert_weights.load_pipeline(o / "teacher")
    shutil.rmtree(to / "toy.tmp", ignore_errors=True)
    convert_weights.to_diffusers(replace(pipe, name="toy"), to / "toy.tmp", dtype=torch.float16)
    shutil.rmtree(to / "toy", ignore_errors=True)
    os.replace(to / "toy.tmp", to / "toy")
    size = sum(f.stat().st_size for f in (to / "toy").rglob("*") if f.is_file())
    log(f"published {to / 'RESULTS.md'}, {to / 'results'} and {to / 'toy'} ({size / 1e6:.1f} MB)")

# -----------------------------------------------------------------------------
# Command line:  python toy.py reproduce --out runs/toy [--quick];  python toy.py publish --out runs/toy


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    ap.add_argument("command", choices=["reproduce", "publish"], help="reproduce: run (or resume) every stage; "
                    "publish: copy RESULTS.md, results/ and the fp16 teacher (toy/) into --to")
    ap.add_argument("--out", default="runs/toy", help="every stage's outputs; a rerun resumes from them")
    ap.add_argument("--quick", action="store_true", help="every stage in miniature (seconds per stage): a check")
    ap.add_argument("--to", default=str(Path(__file__).parent), help="where publish writes (the repository)")
    ap.add_argument("--threads", type=int, help="CPU threads (default: torch's); 1 is robust on a busy machine, "
                                                "where toy-sized ops on 2 threads wait at every barrier")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                    help="where distill.py trains and the models draw (auto: a GPU if there is one)")
    args = ap.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        ap.error(f"--threads must be >= 1, got {args.threads}")
    device = args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    if args.threads or args.quick:  # the quick run's toy-sized ops gain nothing from threads but barrier waits
        torch.set_num_threads(args.threads or 1)
    plan = QUICK if args.quick else Plan()
    if args.quick:
        print("*" * 78 + "\n*** QUICK RUN: every stage in miniature; the models are barely trained ***\n" + "*" * 78,
              file=sys.stderr)
    if args.command == "publish":
        publish(Path(args.out), args.to)
    else:
        reproduce(args.out, plan, device)


if __name__ == "__main__":
    main()
