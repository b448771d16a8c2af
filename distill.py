"""
BK-SDM distillation pretraining: a block-removed student U-Net, initialised from the teacher's weights, learns
from the data (task loss) and from the teacher's output and intermediate features (knowledge distillation).

References
1) Kim et al., "BK-SDM: A Lightweight, Fast, and Cheap Version of Stable Diffusion", arXiv 2305.15798:
   L = lambda_task L_task + lambda_out L_outKD + lambda_feat L_featKD (eqs. 1-3 below), teacher initialisation.
2) Official code: Nota-NetsPresso/BK-SDM `src/kd_train_text_to_image.py` (`copy_weight_from_teacher`, the hooked
   layer lists, the loop), itself diffusers 0.15's train_text_to_image.py; EMA as diffusers 0.15 `EMAModel`.
3) Ho et al., "Denoising Diffusion Probabilistic Models", arXiv 2006.11239: q(x_t | x_0), eq. (4).
Checkpoint format: the student and EMA U-Nets keep diffusers' parameter names; checkpoints are one safetensors
file (student., ema., optim. tensors) with the run state as JSON metadata; the result is a diffusers folder.

Note on the numbers (BK-SDM issue #21): the feature-KD loss is much larger than the other two, the lambdas (all 1)
were never tuned, and lower losses late in training did not mean better FID. Watch the validation images.
Extension points: other removal patterns (--student-config), LoRA students, other teachers.
"""
import argparse
import csv
import hashlib
import io
import json
import math
import os
import signal
import shutil
import sys
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image, ImageDraw
from safetensors import safe_open
from safetensors.torch import save_file

import convert_weights
import sampler
from unet import UNet, UNetConfig, keep_freed_memory

# -----------------------------------------------------------------------------
# 1. The student: the removal rule, initialisation from the teacher, the feature taps

ARCHS = ("base", "small", "tiny")


def student_config(teacher_cfg: UNetConfig, arch: str) -> UNetConfig:
    """The paper's removal rule applied to any teacher: base keeps one (resnet, attention) pair per down stage (so
    each up stage keeps two), small also drops the mid-block, tiny also drops the innermost stage."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    n = len(teacher_cfg.block_out_channels)
    cfg = replace(teacher_cfg, layers_per_block=(1,) * n, mid_block=teacher_cfg.mid_block and arch == "base")
    if arch == "tiny":
        keep = lambda v: v[:-1]  # noqa: E731
        cfg = replace(cfg, block_out_channels=keep(cfg.block_out_channels), layers_per_block=keep(cfg.layers_per_block),
                      cross_attn=keep(cfg.cross_attn), num_heads=keep(cfg.num_heads))
    return cfg


def teacher_key(key, tcfg, scfg):
    """The teacher tensor that initialises student tensor `key`. Official table (copy_weight_from_teacher), as a rule:
    every name is kept, except that the last pair of an up stage comes from the teacher's last pair (its resnet eats
    the skip from the stage's input, whose width differs), and up stages shift by the number of dropped stages."""
    p = key.split(".")
    if p[0] == "up_blocks":
        j, shift = int(p[1]), len(tcfg.block_out_channels) - len(scfg.block_out_channels)
        i = len(scfg.block_out_channels) - 1 - j  # the down stage this up stage mirrors
        p[1] = str(j + shift)
        if p[2] in ("resnets", "attentions") and int(p[3]) == scfg.layers_per_block[i]:
            p[3] = str(tcfg.layers_per_block[i])
    return ".".join(p)


def build_student(teacher: UNet, arch_or_cfg) -> UNet:
    """A new fp32 U-Net on the teacher's device, every tensor copied from the teacher by teacher_key()."""
    tcfg = teacher.cfg
    scfg = student_config(tcfg, arch_or_cfg) if isinstance(arch_or_cfg, str) else arch_or_cfg
    with torch.device("meta"):  # shapes only: every tensor is assigned below
        student = UNet(scfg)
    src, sd, bad = teacher.state_dict(), {}, []
    for k, v in student.state_dict().items():
        tk = teacher_key(k, tcfg, scfg)
        if tk not in src or src[tk].shape != v.shape:  # e.g. more pairs or stages than the teacher, other widths
            bad.append(f"{k} {tuple(v.shape)} <- {tk} {tuple(src[tk].shape) if tk in src else 'missing'}")
        else:
            sd[k] = src[tk].detach().to(torch.float32, copy=True)  # fp32 master weights, not the teacher's storage
    if bad:
        raise ValueError(f"the student does not fit the teacher (the copy keeps each kept stage's first down pairs and "
                         f"up pairs 0 and last): {len(bad)} tensors, e.g. {'; '.join(bad[:2])}")
    student.load_state_dict(sd, strict=True, assign=True)
    return student


def feature_taps(teacher_cfg, student_cfg):
    """(teacher module, student module) pairs whose outputs feature KD matches: every down and up stage output
    (after its sampler). When stages were dropped (tiny), the student's innermost stage lost its downsampler, so
    its last transformer's proj_out (before the residual add) is matched instead, and up stages shift."""
    n_s = len(student_cfg.block_out_channels)
    shift = len(teacher_cfg.block_out_channels) - n_s

    def inner(cfg, i):
        last = cfg.layers_per_block[i] - 1
        return f"down_blocks.{i}.attentions.{last}.proj_out" if cfg.cross_attn[i] else f"down_blocks.{i}.resnets.{last}"
    down = [(f"down_blocks.{i}",) * 2 for i in range(n_s - 1 if shift else n_s)]
    if shift:
        down.append((inner(teacher_cfg, n_s - 1), inner(student_cfg, n_s - 1)))
    return down + [(f"up_blocks.{j + shift}", f"up_blocks.{j}") for j in range(n_s)]

# -----------------------------------------------------------------------------
# 2. The loss


def unwrap(model):
    """The U-Net inside DistributedDataParallel (.module) or torch.compile (._orig_mod)."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


@contextmanager
def capture(modules):
    """Record each module's output (the first element of a tuple: DownBlock returns (h, skips)) during the block.
    The hooks sit on module objects, not on names that DDP's `module.` prefix breaks (BK-SDM issue #10), and are
    removed on exit: gradient checkpointing re-runs forwards during backward, which then records nothing."""
    feats = [None] * len(modules)

    def keep(i):
        def hook(module, args, out):
            feats[i] = out[0] if isinstance(out, tuple) else out
        return hook
    handles = [m.register_forward_hook(keep(i)) for i, m in enumerate(modules)]
    try:
        yield feats
    finally:
        for h in handles:
            h.remove()


def kd_losses(student, teacher, taps, x_t, t, context, target, lambdas=(1.0, 1.0, 1.0)):
    """BK-SDM's loss on one batch -> {task, out, feat, total} scalars. Each MSE is in fp32 with mean reduction.
    The frozen teacher sees the same x_t, t and text states, in its own dtype, without a graph. With both KD
    weights 0 the teacher is not run: that is the plain diffusion loss (LDM eq. 2), how toy.py trains a teacher."""
    if lambdas[1] == lambdas[2] == 0:
        eps_S = student(x_t, t, context)
        task, zero = F.mse_loss(eps_S.float(), target.float()), torch.zeros((), device=x_t.device)
        return dict(total=lambdas[0] * task, task=task, out=zero, feat=zero)
    t_dtype = next(unwrap(teacher).parameters()).dtype
    with torch.no_grad(), capture([unwrap(teacher).get_submodule(a) for a, _ in taps]) as f_T:
        eps_T = teacher(x_t.to(t_dtype), t, context.to(t_dtype))
    with capture([unwrap(student).get_submodule(b) for _, b in taps]) as f_S:
        eps_S = student(x_t, t, context)
    task = F.mse_loss(eps_S.float(), target.float())  # (1) L_task = |eps - eps_S(z_t, y, t)|^2
    out = F.mse_loss(eps_S.float(), eps_T.float())  # (2) L_outKD = |eps_T - eps_S|^2
    feat = sum(F.mse_loss(s.float(), f.float()) for s, f in zip(f_S, f_T))  # (3) sum over layers, not the mean
    total = lambdas[0] * task + lambdas[1] * out + lambdas[2] * feat
    return dict(total=total, task=task, out=out, feat=feat)


@torch.no_grad()
def ema_update(ema, model, n):
    """The n-th EMA update (n = 1, 2, ...), diffusers 0.15 EMAModel's rule: decay = min(0.9999, (1 + s) / (10 + s))
    with s = n - 1, so the first update (decay 0) copies the weights."""
    s = n - 1
    decay = 0.0 if s == 0 else min(0.9999, (1 + s) / (10 + s))
    for e, p in zip(ema.parameters(), model.parameters()):
        e.sub_((1.0 - decay) * (e - p.detach()))  # e <- decay * e + (1 - decay) * p, written as diffusers does

# -----------------------------------------------------------------------------
# 3. Data: records (source, offset, size, caption) from a metadata.csv folder, webdataset shards, or memory


def read_metadata_csv(folder):
    """-> records and the count of malformed rows (wrong field count, empty file name or caption)."""
    records, bad = [], 0
    with open(folder / "metadata.csv", newline="", encoding="utf-8-sig", errors="replace") as f:  # -sig: a BOM
        rows = csv.reader(line.replace("\0", "") for line in f)  # a NUL byte would stop the csv module
        header = [h.strip() for h in next(rows, [])]
        if "file_name" not in header or "text" not in header:
            raise ValueError(f"{folder / 'metadata.csv'}: the header must name the columns file_name and text")
        fi, ti = header.index("file_name"), header.index("text")
        for row in rows:
            if len(row) != len(header) or not row[fi].strip() or not row[ti].strip():
                bad += 1
            else:
                records.append((str(folder / row[fi].strip()), None, None, row[ti].strip()))
    return records, bad


def read_tar_shards(paths):
    """webdataset shards as img2dataset writes them ({key}.jpg|png|webp + {key}.txt). A record points into its
    tar (offset, size): reading an image is one seek. A key without an image or a caption is a bad row."""
    records, bad = [], 0
    for path in paths:
        with tarfile.open(path) as tar:
            groups = {}
            for m in filter(tarfile.TarInfo.isfile, tar.getmembers()):
                folder, _, name = m.name.rpartition("/")
                key, _, ext = name.partition(".")  # webdataset: the key ends at the first dot of the file name
                groups.setdefault((folder, key), {})[ext.lower()] = m
            for g in groups.values():
                img = next((g[e] for e in ("jpg", "jpeg", "png", "webp") if e in g), None)
                text = tar.extractfile(g["txt"]).read().decode("utf-8", "replace").strip() if "txt" in g else ""
                if img is None or not text:
                    bad += 1
                else:
                    records.append((str(path), img.offset_data, img.size, text))
    return records, bad


def synthetic_records(n, seed):
    """The smoke run's data, made in memory: PNGs of a coloured shape on a coloured ground, with their captions."""
    colours = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}
    names, g, records = list(colours), np.random.default_rng(seed), []
    for _ in range(n):
        fg, bg = g.choice(names, 2, replace=False)
        shape, box = ["circle", "square"][g.integers(2)], [int(v) for v in g.integers(5, 30, 2)] + [70, 60]
        im = Image.new("RGB", (96, 80), colours[bg])
        getattr(ImageDraw.Draw(im), "ellipse" if shape == "circle" else "rectangle")(box, colours[fg])
        buf = io.BytesIO()
        im.save(buf, "PNG")
        records.append(("<memory>", buf.getvalue(), None, f"a {fg} {shape} on a {bg} background"))
    return records


def load_image(record, size):
    """A record -> (3, size, size) in [-1, 1]: shorter side to `size` (bilinear), centre crop, as the official
    transforms; None when the image is missing or unreadable (the caller skips and counts it)."""
    path, offset, length, _ = record
    try:
        if path == "<memory>":
            data = offset
        else:
            with open(path, "rb") as f:
                f.seek(offset or 0)
                data = f.read(-1 if length is None else length)
        with Image.open(io.BytesIO(data)) as im:
            im = im.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    s = size / min(im.size)
    im = im.resize((max(size, round(im.width * s)), max(size, round(im.height * s))), Image.BILINEAR)
    left, top = (im.width - size) // 2, (im.height - size) // 2
    im = im.crop((left, top, left + size, top + size))
    return torch.from_numpy(np.asarray(im, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)  # (3, size, size)


class Stream:
    """An endless seeded walk over the records, a new permutation each epoch. Rank r of W takes the global positions
    r, r + W, r + 2W, ...; k, how many it took, is the whole data position a checkpoint saves. load(record) -> an
    item, or None for an unreadable one, which is skipped and counted."""

    def __init__(self, records, load, seed, rank, world):
        self.records, self.load, self.seed, self.rank, self.world = records, load, seed, rank, world
        self.k, self.epoch, self.skipped = 0, -1, 0
        self.pool = ThreadPoolExecutor(8)  # PIL decodes outside the GIL: 8 images at a time

    def next(self):
        epoch, i = divmod(self.rank + self.k * self.world, len(self.records))
        self.k += 1
        if epoch != self.epoch:  # the same permutation on every rank and after a resume
            self.epoch, self.perm = epoch, torch.randperm(len(self.records),
                                                          generator=torch.Generator().manual_seed(self.seed + epoch))
        return self.records[self.perm[i]]

    def batch(self, B):
        items, misses = [], 0
        while len(items) < B:  # take as many records as are missing, in order: the same result as one at a time
            for item in self.pool.map(self.load, [self.next() for _ in range(B - len(items))]):
                if item is None:
                    self.skipped, misses = self.skipped + 1, misses + 1
                else:
                    items.append(item)
            if misses > len(self.records):
                raise RuntimeError("no readable image in the data: every image is missing or corrupt")
        return items


class LatentCache:
    """--cache-latents: each image's VAE moments (mean, std; and its flipped twin's) and its caption's text states,
    in safetensors shards of 1,000 samples, so that training runs neither the VAE encoder nor the text encoder.
    Each shard stores a fingerprint of what made it: its records (files by name and size: the data may move), the
    size, the precision and the encoders' weights (both flips are always cached); a shard from other data or
    settings is made again, an equal one is kept."""
    N = 1000

    def __init__(self, folder, records, parts, amp, rank, world, dtype):
        self.folder, self.shards = Path(folder), {}
        self.folder.mkdir(parents=True, exist_ok=True)
        made, rebuilt = hashlib.sha256(f"{parts.size} {dtype}".encode()), 0
        for v in (*parts.vae.state_dict().values(), *parts.text_encoder.state_dict().values()):  # the weights (fp32)
            made.update(v.detach().float().cpu().numpy().tobytes())  # whatever name or path they were loaded from
        for s in range(rank, math.ceil(len(records) / self.N), world):  # each rank writes its share of the shards
            shard = [(Path(r[0]).name, r[1], r[2], r[3]) if r[1] is not None else  # a tar member, or in memory
                     (Path(r[0]).name, os.path.getsize(r[0]) if os.path.isfile(r[0]) else -1, r[3])  # a file: by
                     for r in records[s * self.N:(s + 1) * self.N]]  # name and size, not the path --data spelled
            fp = hashlib.sha256(made.digest() + repr(shard).encode()).hexdigest()
            path = self.folder / f"{s:06d}.safetensors"
            if path.is_file():
                with safe_open(str(path), "pt") as f:
                    if (f.metadata() or {}).get("fingerprint") == fp:
                        continue  # written before the run was interrupted
            rebuilt += path.is_file()
            rows = {k: [] for k in ("mean", "std", "mean_flip", "std_flip", "context", "ok")}
            for recs in (records[b:b + 8] for b in range(s * self.N, min((s + 1) * self.N, len(records)), 8)):
                xs = [load_image(r, parts.size) for r in recs]
                x = torch.stack([torch.zeros(3, parts.size, parts.size) if v is None else v for v in xs])
                with torch.no_grad(), amp:
                    for sfx, img in (("", x), ("_flip", x.flip(-1))):
                        post = parts.vae.encode(img.to(parts.device))
                        rows["mean" + sfx].append(post.mean.float().cpu())
                        rows["std" + sfx].append(post.std.float().cpu())
                    rows["context"].append(parts.text_encoder(parts.tokenizer([r[3] for r in recs]).to(parts.device)))
                rows["ok"].append(torch.tensor([v is not None for v in xs]))
            tmp = self.folder / f"{s:06d}.tmp"
            save_file({k: torch.cat(v).float().cpu().contiguous() for k, v in rows.items()}, str(tmp),
                      metadata={"fingerprint": fp})
            os.replace(tmp, path)
        if rebuilt:
            print(f"{self.folder}: made {rebuilt} shards again (from other data or settings)", file=sys.stderr)

    def load(self, i):
        """Sample i's (mean, std, mean_flip, std_flip, context); None when its image was unreadable."""
        s, r = divmod(i, self.N)
        if s not in self.shards:
            self.shards[s] = safe_open(str(self.folder / f"{s:06d}.safetensors"), "pt")
        f = self.shards[s]
        if not f.get_slice("ok")[r:r + 1].item():
            return None
        return [f.get_slice(k)[r] for k in ("mean", "std", "mean_flip", "std_flip", "context")]

# -----------------------------------------------------------------------------
# 4. The training step: DDPM's forward process on the teacher's latents, the loss, accumulation, AdamW


def make_micro_batch(stream, cache, gen, B, rank, world, prediction, ab, parts, amp, drop_caption=0.0, flip=True):
    """Latents (a VAE posterior sample x 0.18215) and text states; timesteps uniform in [0, 1000), noise, and x_t by
    DDPM eq. (4). Random numbers are drawn for the global batch (B x world) from a generator that is the same on
    every rank, and each rank keeps its share: N processes draw exactly what one process would. drop_caption: the
    share of captions replaced by "" (SD's 10%, which classifier-free guidance needs; BK-SDM drops none). flip=False:
    no random horizontal flips, for captions that say left or right (toy.py's)."""
    items, dev = stream.batch(B), parts.device
    G, shape = B * world, (parts.latent_channels, parts.size // parts.factor, parts.size // parts.factor)
    flip = (torch.rand(G, generator=gen)[rank::world] < 0.5) & flip  # random horizontal flip (drawn either way)
    t = torch.randint(0, len(ab), (G,), generator=gen)[rank::world]
    eps_vae, noise = (torch.randn((G, *shape), generator=gen)[rank::world].to(dev) for _ in range(2))
    with torch.no_grad(), amp:
        if cache is None:
            x = torch.stack([im.flip(-1) if f else im for (im, _), f in zip(items, flip.tolist())]).to(dev)
            post = parts.vae.encode(x)
            mean, std, context = post.mean, post.std, parts.text_encoder(parts.tokenizer([c for _, c in items]).to(dev))
        else:
            rows = [(it[2], it[3]) if f else (it[0], it[1]) for it, f in zip(items, flip.tolist())]  # the twin
            mean, std = (torch.stack(v).to(dev) for v in zip(*rows))
            context = torch.stack([it[4] for it in items]).to(dev)
        z0 = ((mean + std * eps_vae) * parts.scaling_factor).float()
        if drop_caption:  # drawn only when asked, so that runs without it keep their random stream
            drop = (torch.rand(G, generator=gen)[rank::world] < drop_caption).to(dev)
            empty = parts.text_encoder(parts.tokenizer([""]).to(dev)).to(context.dtype)
            context = torch.where(drop[:, None, None], empty, context)
    a = ab.to(dev)[t.to(dev)][:, None, None, None]
    x_t = a.sqrt() * z0 + (1 - a).sqrt() * noise  # eq. (4): q(x_t | x_0) = N(sqrt(ab_t) x_0, (1 - ab_t) I)
    # the target: the noise; for v-prediction teachers (SD 2.x-768) v = sqrt(ab) eps - sqrt(1 - ab) x_0
    target = noise if prediction == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * z0
    return x_t, t.to(dev), context.float(), target


def kd_step(student, teacher, taps, micro_batches, accum, opt, scaler, amp, max_grad_norm=1.0,
            lambdas=(1.0, 1.0, 1.0)):
    """One optimizer step over `accum` micro-batches (x_t, t, context, target) = micro_batches(i): gradients summed
    (DDP syncs them on the last one only), clipped to max_grad_norm, then AdamW. Returns the mean losses."""
    logs = dict(total=0.0, task=0.0, out=0.0, feat=0.0)
    for i in range(accum):
        x_t, t, context, target = micro_batches(i)
        with nullcontext() if i == accum - 1 or not hasattr(student, "no_sync") else student.no_sync():
            with amp:
                losses = kd_losses(student, teacher, taps, x_t, t, context, target, lambdas)
            scaler.scale(losses["total"] / accum).backward()  # the mean over the accumulated micro-batches
        for k, v in losses.items():
            logs[k] += v.item() / accum
    scaler.unscale_(opt)  # clip the true gradients, not fp16-scaled ones
    torch.nn.utils.clip_grad_norm_(student.parameters(), max_grad_norm)
    scaler.step(opt)  # skipped if fp16 gradients overflowed
    scaler.update()
    opt.zero_grad(set_to_none=True)
    return logs

# -----------------------------------------------------------------------------
# 5. Checkpoints: one safetensors file (student., ema., optim., rng. tensors; the run state as JSON metadata),
#    written under a temporary name and renamed: a run killed at any moment leaves no partial file


def checkpoints(folder):
    """{step: path} of a run folder's checkpoint-XXXXXXXX.safetensors files: steps by number, not names by sort."""
    found = {p.stem.removeprefix("checkpoint-"): p for p in Path(folder).glob("checkpoint-*.safetensors")}
    return {int(k): p for k, p in found.items() if k.isdigit()}


def save_checkpoint(path, student, ema, opt, scaler, state):
    tensors = {f"student.{k}": v for k, v in unwrap(student).state_dict().items()}
    tensors.update({f"ema.{k}": v for k, v in ema.state_dict().items()})
    osd = opt.state_dict()
    for i, st in osd["state"].items():
        tensors.update({f"optim.{i}.{k}": v for k, v in st.items()})
    tensors.update({f"rng.{k}": v for k, v in state.pop("rng").items()})
    meta = dict(state, param_groups=osd["param_groups"], scaler=scaler.state_dict())
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, f"{path}.tmp",
              metadata={"minisd": json.dumps(meta)})
    os.replace(f"{path}.tmp", path)


def load_checkpoint(path, student, ema, opt, scaler, run):
    """Restore weights, EMA, optimizer and loss scaler from the file or a folder's newest readable checkpoint (a
    corrupt one is skipped with a warning) if its settings equal `run`; return the step, data positions, RNG state."""
    path = Path(path)
    for found in [path] if path.is_file() else [p for _, p in sorted(checkpoints(path).items())[::-1]]:
        try:
            with safe_open(str(found), "pt") as f:
                meta, sd = json.loads(f.metadata()["minisd"]), {k: f.get_tensor(k) for k in f.keys()}
            break
        except Exception as e:  # truncated, or not one of ours: say which and why, in one line
            print(f"warning: --resume: skipped {found} ({type(e).__name__}: {e})", file=sys.stderr)
    else:
        raise SystemExit(f"error: --resume {path}: no readable distill.py checkpoint")
    saved = {k: meta.get(k, v) for k, v in run.items()}  # a key older checkpoints lack is not checked
    if saved != run:  # e.g. another precision would fail in GradScaler, another seed change the data order
        raise SystemExit("error: resume with the run's saved " + ", ".join(
            f"{'processes' if k == 'world' else '--' + k.replace('_', '-')} {saved[k]} (not {v})"
            for k, v in run.items() if saved[k] != v))
    part = lambda p: {k[len(p):]: v for k, v in sd.items() if k.startswith(p)}  # noqa: E731
    unwrap(student).load_state_dict(part("student."), strict=True)
    ema.load_state_dict(part("ema."), strict=True)
    state, device = {}, next(student.parameters()).device
    for k, v in part("optim.").items():
        i, name = k.split(".", 1)
        state.setdefault(int(i), {})[name] = v if name == "step" else v.to(device)
    opt.load_state_dict(dict(state=state, param_groups=meta.pop("param_groups")))
    scaler.load_state_dict(meta.pop("scaler"))
    return dict(meta, rng=part("rng."))

# -----------------------------------------------------------------------------
# 6. The run


def load_teacher(args, device):
    """The teacher pipeline: random tiny-test weights (smoke run), a path, or a hub repo, cached or fetched."""
    if args.random_weights:
        return sampler.random_pipeline("tiny-test", seed=args.seed)
    t = args.teacher
    if not Path(t).exists() and (t.count("/") != 1 or t.startswith((".", "/", "~")) or Path(t).suffix):
        raise SystemExit(f"error: --teacher {t}: no such file or folder (a hub repo id reads owner/name)")
    try:
        path = t if Path(t).exists() else convert_weights.cached(t) or convert_weights.download(t)
    except OSError as e:
        raise SystemExit(f"error: teacher {t} is not a local path and cannot be fetched ({e}). Pass "
                         "--teacher PATH (a diffusers folder or a .safetensors/.ckpt file), or run offline: "
                         "python distill.py --arch base --random-weights")
    try:
        return convert_weights.load_pipeline(path, dtype=torch.float32, device=device)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}")


def load_data(args):
    """-> records and the count of bad rows; a clear error when there is no data or no usable row."""
    if args.random_weights:
        return synthetic_records(32, args.seed), 0
    if not args.data:
        raise SystemExit("error: no --data: give a folder with metadata.csv (file_name,text) or webdataset .tar "
                         "shards (the README says where to get the paper's 212k LAION-Aesthetics pairs), or run "
                         "offline: python distill.py --arch base --random-weights")
    data = Path(args.data)
    tars = sorted(data.glob("*.tar")) if data.is_dir() else [data] if data.suffix == ".tar" else []
    if not tars and not (data / "metadata.csv").exists() and (data / "train" / "metadata.csv").is_file():
        data = data / "train"  # the Hugging Face imagefolder layout (preprocessed_212k/train/metadata.csv)
    try:
        records, bad = read_tar_shards(tars) if tars else read_metadata_csv(data)
    except (OSError, ValueError, tarfile.TarError) as e:
        raise SystemExit(f"error: cannot read --data {data}: {e}")
    if not records:
        raise SystemExit(f"error: --data {data} has no usable row ({bad} malformed)")
    return records, bad


def check_args(ap, args):
    """Numbers that would fail late or silently, and an --out that cannot be written: found before anything loads."""
    for name in ("batch", "grad_accum", "max_steps", "save_every", "resolution"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.val_every < 0 or args.lr is not None and not (math.isfinite(args.lr) and args.lr > 0):
        ap.error(f"need --val-every >= 0 and a finite --lr > 0, got {args.val_every} and {args.lr}")
    if not (0 <= args.drop_caption <= 1 and all(math.isfinite(v) and v >= 0 for v in args.lambdas)):
        ap.error(f"need 0 <= --drop-caption <= 1 and finite --lambdas >= 0, got {args.drop_caption}, {args.lambdas}")
    try:
        Path(args.out).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        ap.error(f"cannot write to --out {args.out}: {e.strerror or e}")
    if args.random_weights and (args.data or args.teacher != ap.get_default("teacher")):
        ap.error("--random-weights makes its own teacher (tiny-test, random) and data (synthetic): drop --teacher "
                 "and --data, or --random-weights")
    if not args.resume and checkpoints(args.out):  # never mix two runs (a log alone: a run cut before its first save)
        raise SystemExit(f"error: --out {args.out} holds a run: --resume it or use another --out")


def main(argv=None):
    ap = parser()
    keep_freed_memory()  # this process is ours: no page faults on every step's tensors
    args = ap.parse_args(argv)
    for k, v in (SMOKE if args.random_weights else FULL).items():  # defaults that depend on the mode
        setattr(args, k, v if getattr(args, k) is None else getattr(args, k))
    check_args(ap, args)
    if args.random_weights:
        print("*" * 78 + "\n*** SMOKE RUN: a tiny-test teacher with RANDOM weights, synthetic images: the result "
              "is noise ***\n" + "*" * 78, file=sys.stderr)
        torch.set_num_threads(1)  # toy-sized ops: threads only add barriers (6 s vs 70 s on a busy 2-core machine)
    # 1. processes and devices: torchrun sets WORLD_SIZE, RANK, LOCAL_RANK; gloo on CPUs, nccl on GPUs
    world, rank, local = (int(os.environ.get(k, d)) for k, d in (("WORLD_SIZE", 1), ("RANK", 0), ("LOCAL_RANK", 0)))
    cuda = torch.cuda.is_available() and args.device != "cpu"
    device = torch.device(f"cuda:{local}" if cuda else "cpu")
    if world > 1:
        dist.init_process_group("nccl" if cuda else "gloo")
    precision = args.precision if args.precision != "auto" else "fp32" if not cuda else \
        "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if precision == "fp16" and not cuda:
        raise SystemExit("error: --precision fp16 needs a GPU (PyTorch lacks CPU half kernels): use bf16 or fp32")
    dtype = dict(fp32=torch.float32, bf16=torch.bfloat16, fp16=torch.float16)[precision]
    amp = torch.autocast(device.type, dtype) if dtype != torch.float32 else nullcontext()
    torch.manual_seed(args.seed)  # the global RNG too (the run's own draws use the generators below)
    # 2. data, teacher, student: every check before the first step
    records, bad_rows = load_data(args)
    pipe = load_teacher(args, device)
    size = args.resolution or (64 if args.random_weights else  # the teacher's training size: 512 for SD v1
                               pipe.unet_cfg.sample_size * pipe.vae_cfg.downsample_factor)
    try:
        scfg = UNetConfig.from_diffusers(json.loads(Path(args.student_config).read_text())) \
            if args.student_config else student_config(pipe.unet_cfg, args.arch)
        student = (UNet(scfg) if args.init == "random" else build_student(pipe.unet, scfg)).to(device).train()
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: --student-config {args.student_config}: {e}" if args.student_config else
                         f"error: {e}")
    n = max(len(c.block_out_channels) for c in (pipe.unet_cfg, scfg))  # U-Net stages: all but the last halve
    mult = pipe.vae_cfg.downsample_factor * 2 ** (n - 1)
    if size % mult:  # else the first step fails (odd-sized skips), after the teacher loaded and the cache was made
        raise SystemExit(f"error: --resolution {size} is not a multiple of {mult} (the VAE's factor x 2^{n - 1} for "
                         f"{n} U-Net stages): use " + " or ".join(str(v) for v in (size // mult * mult,
                                                                                  size // mult * mult + mult) if v))
    student.gradient_checkpointing = args.gradient_checkpointing == "on" or \
        args.gradient_checkpointing == "auto" and not args.random_weights
    ema = build_student(student, scfg).eval().requires_grad_(False)  # the EMA weights, the model we export
    teacher = pipe.unet.to(device, dtype).eval().requires_grad_(False)  # frozen, in the mixed-precision dtype
    for m in (pipe.vae, pipe.text_encoder):  # frozen too; kept in fp32 (exported as loaded), run under autocast
        m.to(device).eval().requires_grad_(False)
    taps = feature_taps(pipe.unet_cfg, scfg)
    sched = pipe.scheduler_config or convert_weights.SD_V1_SCHEDULER
    if sched.get("prediction_type", "epsilon") != "epsilon" and args.val_every:
        print("validation images are off: sampler.py samples epsilon-prediction models only", file=sys.stderr)
        args.val_every = 0
    ab = sampler.alphas_cumprod(sampler.SamplerConfig.from_diffusers(dict(sched, prediction_type="epsilon")))
    model = torch.nn.parallel.DistributedDataParallel(student, [local] if cuda else None) if world > 1 else student
    opt = torch.optim.AdamW(student.parameters(), lr=LR if args.lr is None else args.lr, betas=(0.9, 0.999),
                            weight_decay=1e-2, eps=1e-8)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)  # a loss scaler for fp16 only
    parts = SimpleNamespace(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, size=size,
                            factor=pipe.vae_cfg.downsample_factor, latent_channels=pipe.unet_cfg.in_channels,
                            scaling_factor=pipe.vae_cfg.scaling_factor, device=device)
    out = Path(args.out)
    gen = torch.Generator().manual_seed(args.seed)  # flips, timesteps, noise: the same stream on every rank
    run = dict(world=world, batch=args.batch, grad_accum=args.grad_accum, precision=precision, seed=args.seed,
               resolution=size)  # saved in each checkpoint; a resume must keep them
    step, skipped0, data_k = 0, bad_rows, 0
    if not args.resume and rank == 0:  # a log left by a run cut before its first checkpoint: nothing to resume
        (out / "log.jsonl").unlink(missing_ok=True)
    if args.resume:  # 3. everything a step depends on comes back: exact continuation
        st = load_checkpoint(args.resume, student, ema, opt, scaler, run)
        step, skipped0, data_k = st["step"], st["skipped"], st["data_k"][rank]
        gen.set_state(st["rng"]["gen"])
        if args.lr is not None and args.lr != opt.param_groups[0]["lr"]:  # given: it wins over the saved one
            print(f"--lr {args.lr} replaces the checkpoint's {opt.param_groups[0]['lr']}", file=sys.stderr)
            for g in opt.param_groups:
                g["lr"] = args.lr
        if rank == 0 and (out / "log.jsonl").is_file():  # drop what was logged after the checkpoint
            keep = [ln for ln in (out / "log.jsonl").read_text().splitlines()  # a line cut by a kill has no "}"
                    if ln.endswith("}") and json.loads(ln)["step"] <= step]
            (out / "log.tmp").write_text("".join(ln + "\n" for ln in keep))
            os.replace(out / "log.tmp", out / "log.jsonl")
    cache = LatentCache(out / "latent_cache", records, parts, amp, rank, world, dtype) if args.cache_latents else None
    if cache is not None and world > 1:
        dist.barrier()  # every shard written
    load = cache.load if cache else lambda rec: None if (x := load_image(rec, size)) is None else (x, rec[3])
    stream = Stream(range(len(records)) if cache else records, load, args.seed, rank, world)
    stream.k = data_k
    # 4. the loop. SIGINT/SIGTERM only set a flag: the step finishes, a checkpoint is saved, the run exits
    stop = [0]
    old = {s: signal.signal(s, lambda *_: stop.__setitem__(0, 1)) for s in (signal.SIGINT, signal.SIGTERM)}
    t_start, first = time.time(), step

    def micro(i):
        return make_micro_batch(stream, cache, gen, args.batch, rank, world, sched.get("prediction_type", "epsilon"),
                                ab, parts, amp, args.drop_caption, not args.no_flip)

    def save():
        ks = [torch.tensor([stream.k]) for _ in range(world)]
        if world > 1:
            dist.all_gather(ks, torch.tensor([stream.k]))
        if rank == 0:  # rank 0 writes, with every rank's data position
            state = dict(run, step=step, skipped=skipped, data_k=[k.item() for k in ks], rng=dict(gen=gen.get_state()))
            save_checkpoint(out / f"checkpoint-{step:08d}.safetensors", student, ema, opt, scaler, state)
            found = checkpoints(out)
            for k in sorted(k for k in found if k < step)[:-1]:  # keep this one and the newest before it
                found[k].unlink()
    try:
        while step < args.max_steps:
            t0 = time.time()
            logs = kd_step(model, teacher, taps, micro, args.grad_accum, opt, scaler, amp, lambdas=args.lambdas)
            step += 1
            ema_update(ema, student, step)
            sums = torch.tensor([logs["total"], logs["task"], logs["out"], logs["feat"], stream.skipped, stop[0]],
                                dtype=torch.float64)
            if world > 1:  # losses averaged over ranks, skips summed; a signal on any rank stops all
                dist.all_reduce(sums)
                sums[:4] /= world
            skipped = skipped0 + int(sums[4])
            if rank == 0:
                rec = dict(step=step, loss=sums[0].item(), task=sums[1].item(), out=sums[2].item(),
                           feat=sums[3].item(), lr=opt.param_groups[0]["lr"], skipped=skipped,
                           images_per_s=args.batch * args.grad_accum * world / (time.time() - t0))
                with open(out / "log.jsonl", "a") as f:
                    f.write(json.dumps(rec) + "\n")
                left = (time.time() - t_start) / (step - first) * (args.max_steps - step)
                print(f"\rstep {step}/{args.max_steps}: loss {rec['loss']:.4f} (task {rec['task']:.4f}, out "
                      f"{rec['out']:.4f}, feat {rec['feat']:.4f}), {rec['images_per_s']:.1f} img/s, "
                      f"{left / 60:.1f} min left", end="", file=sys.stderr, flush=True)
            if step % args.save_every == 0 or step == args.max_steps or sums[5]:
                save()
            if rank == 0 and args.val_every and (step % args.val_every == 0 or step == args.max_steps):
                validate(pipe, ema, scfg, args.val_prompts, args.seed, size, out / "val" / f"step{step:08d}")
            if sums[5]:
                print(f"\nstopped by a signal at step {step}: continue with --resume {out}", file=sys.stderr)
                return
        if rank == 0:
            export(pipe, ema, scfg, out / "final")
            print(f"\ndone: {out / 'final'} (the EMA weights); losses in {out / 'log.jsonl'}", file=sys.stderr)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        if world > 1:  # gloo's threads free the last collective's tensors under the GIL, and freeing the process
            time.sleep(0.1)  # group joins them holding the GIL: let them have it first (else 1 exit in 7 hung here)
            dist.destroy_process_group()


def student_pipeline(pipe, ema, scfg):
    """The teacher's pipeline with the EMA student as its U-Net."""
    return replace(pipe, unet=ema, unet_cfg=scfg, name=f"BK-SDM student of {pipe.name}",
                   scheduler_config=pipe.scheduler_config or dict(convert_weights.SD_V1_SCHEDULER))


def validate(pipe, ema, scfg, prompts, seed, size, stem):
    """Images for fixed prompts with the EMA weights and a fixed seed (25 PNDM steps, as the official script)."""
    r = sampler.txt2img(student_pipeline(pipe, ema, scfg), prompts, generator=seed, height=size, width=size,
                        progress=False)
    stem.parent.mkdir(exist_ok=True)
    for k, im in enumerate(r.pil()):
        im.save(f"{stem}_{k}.tmp", "PNG")
        os.replace(f"{stem}_{k}.tmp", f"{stem}_{k}.png")


def export(pipe, ema, scfg, folder):
    """A diffusers folder: the EMA student U-Net with the teacher's text encoder, tokenizer, VAE and scheduler."""
    convert_weights.to_diffusers(student_pipeline(pipe, ema, scfg), f"{folder}.tmp")
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(f"{folder}.tmp", folder)

# -----------------------------------------------------------------------------
# Command line:  python distill.py --arch small --data laion_212k/ --out runs/bk-small

LR = 5e-5  # the paper's AdamW learning rate, constant
FULL = dict(batch=64, grad_accum=4, max_steps=50000, save_every=5000, val_every=500)  # the paper's: 256 x 50K
SMOKE = dict(batch=2, grad_accum=1, max_steps=6, save_every=3, val_every=6)  # seconds on a laptop


def parser():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--arch", default="small", choices=ARCHS, help="the removal rule applied to the teacher")
    ap.add_argument("--teacher", default="CompVis/stable-diffusion-v1-4", help="a folder, a single file or a hub repo")
    ap.add_argument("--student-config", help="a diffusers unet/config.json: another removal pattern")
    ap.add_argument("--random-weights", action="store_true", help="offline smoke run: random tiny-test teacher")
    ap.add_argument("--data", help="a folder with metadata.csv (file_name,text) or webdataset .tar shards")
    ap.add_argument("--out", default="runs/distill", help="checkpoints, log.jsonl, val/ and final/")
    ap.add_argument("--resume", help="a run folder (its newest checkpoint) or a checkpoint file")
    ap.add_argument("--resolution", type=int, help="image side (default: the teacher's, 512 for SD v1; 64 with "
                                                   "--random-weights)%(default).0s")
    ap.add_argument("--cache-latents", action="store_true", help="encode images and captions once, into OUT")
    for name, what in (("batch", "micro-batch per process"), ("grad_accum", "micro-batches per optimizer step"),
                       ("max_steps", "optimizer steps"), ("save_every", "steps between checkpoints"),
                       ("val_every", "steps between validation images, 0: never")):  # None: FULL's or SMOKE's value
        ap.add_argument(f"--{name.replace('_', '-')}", type=int,  # %(default).0s prints nothing, says it is there
                        help=f"{what} (default: {FULL[name]}; {SMOKE[name]} with --random-weights)%(default).0s")
    ap.add_argument("--init", default="teacher", choices=["teacher", "random"],
                    help="the student's weights: copied from the teacher (the paper), or random (ablation)")
    ap.add_argument("--lambdas", type=float, nargs=3, default=(1.0, 1.0, 1.0), metavar=("TASK", "OUT", "FEAT"),
                    help="loss weights (the paper: 1 1 1); OUT = FEAT = 0 is plain diffusion training")
    ap.add_argument("--no-flip", action="store_true", help="no random horizontal flips (captions with left/right)")
    ap.add_argument("--drop-caption", type=float, default=0.0, help="share of captions replaced by \"\" (SD: 0.1)")
    ap.add_argument("--val-prompts", nargs="+", default=["a golden vase with different flowers"])
    ap.add_argument("--lr", type=float, help=f"AdamW's learning rate (default: {LR}; with --resume: the "
                                             "checkpoint's)%(default).0s")  # .0s: no "(default: None)" added
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                    help="autocast dtype; auto: bf16 on GPUs that have it, else fp16; fp32 on CPUs")
    ap.add_argument("--gradient-checkpointing", default="auto", choices=["auto", "on", "off"],
                    help="auto: on, but off for the smoke run's toy model")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu"])
    return ap


if __name__ == "__main__":
    main()
