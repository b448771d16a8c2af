"""
The three numbers of the BK-SDM results table, computed as the paper's tools computed them: FID (pytorch-fid 0.3.0),
Inception Score (torch-fidelity) and CLIP score (open_clip ViT-g-14), plus `coco`, the resumable MS-COCO 30K run.

References
1) Heusel et al., "GANs Trained by a Two Time-Scale Update Rule ...", arXiv 1706.08500: FID, eq. (6).
2) Salimans et al., "Improved Techniques for Training GANs", arXiv 1606.03498: IS = exp(E_x KL(p(y|x) || p(y))).
3) Szegedy et al., arXiv 1512.00567 (Inception-v3), as TensorFlow's 2015-12-05 graph that both tools port:
   pytorch-fid 0.3.0 `inception.py` / `fid_score.py`, torch-fidelity 0.4.0 `feature_extractor_inceptionv3.py`,
   `interpolate_compat_tensorflow.py`, `metric_isc.py`. 4) Radford et al., arXiv 2103.00020 (CLIP); open_clip
   `transformer.py` / `transform.py`; transformers `CLIPModel`. 5) Kim et al., arXiv 2305.15798, section 5.
Checkpoint formats: Inception with torchvision's names (`Mixed_5b.branch1x1.conv.weight`), which both tools'
weight files use; CLIP in transformers' `CLIPModel` names, or open_clip's (`visual.transformer.resblocks.0...`),
mapped onto them by open_clip_to_hf().
"""
import argparse
import base64
import csv
import io
import json
import math
import os
import platform
import sys
import warnings
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np
import PIL
import scipy
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from scipy import linalg
from tqdm import tqdm

import clip_text
import convert_weights
from convert_weights import rename  # the LDM rename rules' matcher: `{}` stands for a number

# pytorch-fid's release; torch-fidelity's weights-inception-2015-12-05-6726825d.pth holds the same tensors
INCEPTION_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                 "pt_inception-2015-12-05-6726825d.pth")
CLIP_REPO = "laion/CLIP-ViT-g-14-laion2B-s34B-b88K"  # the paper's open_clip ViT-g-14 laion2b_s34b_b88k
IMAGE_SUFFIXES = {".bmp", ".jpg", ".jpeg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp"}  # pytorch-fid's, any case

# -----------------------------------------------------------------------------
# Inception-v3 as the FID graph. Mirrors pytorch-fid's FIDInception* blocks (torchvision's, patched to TF's graph).


class BasicConv2d(nn.Module):
    """Conv without bias, BatchNorm with TensorFlow's eps 1e-3, ReLU. Mirrors torchvision `BasicConv2d`."""

    def __init__(self, cin, cout, **conv):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **conv)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def chain(x, *layers):
    for layer in layers:
        x = layer(x)
    return x


def pool3x3(x, kind="avg"):
    """The pool branch at stride 1. TF's average pool divides by the pixels it covers, not 9 (count_include_pad=False,
    unlike torchvision), and the graph's very last block max-pools: two quirks of the 2015 graph FID depends on."""
    if kind == "max":
        return F.max_pool2d(x, 3, stride=1, padding=1)
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """Mixed_5b..d (35x35): 1x1, 5x5, double 3x3 and pool branches."""

    def __init__(self, cin, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(cin, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, kernel_size=1)

    def forward(self, x):
        return torch.cat([self.branch1x1(x), chain(x, self.branch5x5_1, self.branch5x5_2),
                          chain(x, self.branch3x3dbl_1, self.branch3x3dbl_2, self.branch3x3dbl_3),
                          self.branch_pool(pool3x3(x))], 1)


class InceptionB(nn.Module):
    """Mixed_6a: 35x35 -> 17x17 with stride-2 branches."""

    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        return torch.cat([self.branch3x3(x), chain(x, self.branch3x3dbl_1, self.branch3x3dbl_2, self.branch3x3dbl_3),
                          F.max_pool2d(x, 3, stride=2)], 1)


class InceptionC(nn.Module):
    """Mixed_6b..e (17x17): 7x7 convolutions factorised into 1x7 and 7x1."""

    def __init__(self, cin, c7):
        super().__init__()
        row, col = dict(kernel_size=(1, 7), padding=(0, 3)), dict(kernel_size=(7, 1), padding=(3, 0))
        self.branch1x1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, **row)
        self.branch7x7_3 = BasicConv2d(c7, 192, **col)
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, **col)
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, **row)
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, **col)
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, **row)
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        return torch.cat([self.branch1x1(x), chain(x, self.branch7x7_1, self.branch7x7_2, self.branch7x7_3),
                          chain(x, self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                                self.branch7x7dbl_4, self.branch7x7dbl_5),
                          self.branch_pool(pool3x3(x))], 1)


class InceptionD(nn.Module):
    """Mixed_7a: 17x17 -> 8x8."""

    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        return torch.cat([chain(x, self.branch3x3_1, self.branch3x3_2),
                          chain(x, self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4),
                          F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):
    """Mixed_7b (average pool) and Mixed_7c (max pool: the graph's quirk), 8x8, with split 1x3 / 3x1 outputs."""

    def __init__(self, cin, pool):
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(cin, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(cin, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(b3), self.branch3x3_2b(b3),
                          self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd),
                          self.branch_pool(pool3x3(x, self.pool))], 1)


def resize_tf1(x, size=299):
    """TensorFlow 1's resize_bilinear (align_corners=False, no half-pixel centres), as torch-fidelity ports it: output
    pixel i reads input coordinate i * in/out, so the top-left corners align. F.interpolate (pytorch-fid) aligns the
    pixel centres instead, (i + 0.5) * in/out - 0.5: the two differ by up to half an input pixel."""
    def axis(n):
        pos = torch.arange(size, dtype=torch.float32, device=x.device) * torch.tensor(n / size, dtype=torch.float32)
        lo = pos.long()
        return lo, (lo + 1).clamp(max=n - 1), pos - lo
    (y0, y1, dy), (x0, x1, dx) = axis(x.shape[2]), axis(x.shape[3])
    rows0, rows1 = x[:, :, y0], x[:, :, y1]  # x first, then y, in torch-fidelity's order of float operations
    top = rows0[..., x0] + (rows0[..., x1] - rows0[..., x0]) * dx
    bottom = rows1[..., x0] + (rows1[..., x1] - rows1[..., x0]) * dx
    return top + (bottom - top) * dy[:, None]


class InceptionV3(nn.Module):
    """uint8 images (B, 3, H, W) of any size, or a list of (3, H, W) -> (pool (B, 2048), logits (B, 1008))."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = InceptionA(192, 32), InceptionA(256, 64), InceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b, self.Mixed_6c = InceptionC(768, 128), InceptionC(768, 160)
        self.Mixed_6d, self.Mixed_6e = InceptionC(768, 160), InceptionC(768, 192)
        self.Mixed_7a, self.Mixed_7b, self.Mixed_7c = InceptionD(768), InceptionE(1280, "avg"), InceptionE(2048, "max")
        self.fc = nn.Linear(2048, 1008)  # 1008 = ImageNet's 1000 classes + 8 unused outputs of the 2015 graph
        self.eval()  # a fixed measuring instrument: BatchNorm always uses its running statistics

    def preprocess(self, images, mode):
        """"fid": pytorch-fid's ToTensor (x / 255), F.interpolate bilinear to 299 (align_corners=False), 2x - 1.
        "isc": torch-fidelity's TF1 resize of the uint8 values (resize_tf1), then (x - 128) / 128."""
        if mode not in ("fid", "isc"):
            raise ValueError(f"preprocess must be 'fid' or 'isc', got {mode!r}")
        if isinstance(images, (list, tuple)):  # sizes may differ: each image is resized on its own
            return torch.cat([self.preprocess(im[None], mode) for im in images])
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 images (B, 3, H, W), got {images.dtype} {tuple(images.shape)}")
        x = images.to(self.fc.weight.device).float()
        if mode == "fid":
            return 2 * F.interpolate(x / 255, size=(299, 299), mode="bilinear", align_corners=False) - 1
        return (resize_tf1(x) - 128) / 128

    def forward(self, images, preprocess="fid"):
        x = self.preprocess(images, preprocess).to(self.fc.weight.dtype)
        x = chain(x, self.Conv2d_1a_3x3, self.Conv2d_2a_3x3, self.Conv2d_2b_3x3)  # (B, 64, 147, 147)
        x = chain(F.max_pool2d(x, 3, stride=2), self.Conv2d_3b_1x1, self.Conv2d_4a_3x3)
        x = chain(F.max_pool2d(x, 3, stride=2), self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a,
                  self.Mixed_6b, self.Mixed_6c, self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b,
                  self.Mixed_7c)  # (B, 2048, 8, 8)
        pool = x.mean((2, 3))  # pool3, the FID features
        # torch-fidelity's IS uses "logits_unbiased": the fc layer without its bias
        logits = pool @ self.fc.weight.T if preprocess == "isc" else self.fc(pool)
        return pool.float(), logits.float()


def random_inception(seed=0):
    """RANDOM weights (offline runs, tests) whose BatchNorm statistics are measured on noise images: with the default
    mean 0 / variance 1 the activations shrink layer by layer until every image has the same features."""
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        model = InceptionV3()
        norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        for m in norms:
            m.momentum = None  # a cumulative average: after one batch the running statistics are that batch's
        model.train()(torch.randint(0, 256, (4, 3, 299, 299), dtype=torch.uint8))
        for m in norms:
            m.momentum = 0.1
    return model.eval()


def inception_file(path=None):
    """The published weights' file: `path`, else torch.hub's cache (pytorch-fid's file, if present), else downloaded
    there by torch.hub with its hash check."""
    if path is not None and not Path(path).is_file():
        raise OSError(f"{path}: no such file")
    if path is None:
        path = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_URL.rsplit("/", 1)[1]
        if not path.exists():
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                torch.hub.download_url_to_file(INCEPTION_URL, str(path), hash_prefix="6726825d")
            except Exception as e:  # no network, a proxy, a bad hash: all end here
                raise OSError(f"cannot fetch the FID Inception weights ({type(e).__name__}: {e}); download "
                              f"{INCEPTION_URL} into {path.parent}/ or pass --inception-weights PATH") from e
    return path


def load_inception(path=None, device="cpu"):
    """The FID Inception with the published weights (inception_file)."""
    model = InceptionV3()
    model.load_state_dict(convert_weights.read_file(inception_file(path))[0], strict=True)
    return model.to(device)

# -----------------------------------------------------------------------------
# Reading images (bad files are skipped and counted) and extracting features


def open_rgb(path, resize=None):
    """PIL as both tools read: grey, palette and RGBA become RGB (alpha dropped). `resize`: what the paper's
    change_img_size did to make real_im256.npz: PIL bicubic to resize x resize, uncropped, in the image's own mode,
    then saved under the file's own name, so that a .jpg was JPEG-encoded again (quality 75, PIL's default) before
    pytorch-fid read it. Here that round trip runs in memory."""
    with Image.open(path) as im:
        im = im if resize and im.mode in ("L", "RGB") else im.convert("RGB")
        if resize:
            im = im.resize((resize, resize), Image.BICUBIC)
        if resize and Path(path).suffix.lower() in (".jpg", ".jpeg"):
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=75)
            im = Image.open(buf)
        return im.convert("RGB")


def read_images(files, resize=None):
    """A DataLoader's collate_fn (so it runs in the workers): paths -> uint8 (3, H, W) tensors; an unreadable file
    stays a path, which features() counts and skips."""
    out = []
    for f in files:
        try:
            out.append(torch.from_numpy(np.asarray(open_rgb(f, resize)).copy()).permute(2, 0, 1))
        except (OSError, ValueError, Image.DecompressionBombError):
            out.append(f)
    return out


def inception_extractor(model, mode="fid"):
    """The default extractor: pool3 features ("fid") or bias-free logits ("isc")."""
    return lambda images: model(images, preprocess=mode)[0 if mode == "fid" else 1]


@torch.no_grad()
def features(images, extractor, batch_size=50, num_workers=0, resize=None, progress=True):
    """images: a folder, a list of files, a uint8 tensor (N, 3, H, W) or a list of (3, H, W) -> (N, D) float64 array.
    extractor: any function from a list of uint8 (3, H, W) tensors to (B, D) features. Unreadable files are skipped
    with one warning that counts them."""
    if isinstance(images, (str, Path)):
        folder = Path(images)
        if not folder.is_dir():
            raise ValueError(f"{folder}: not a folder of images or a .npz statistics file")
        images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise ValueError(f"{folder}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    files = len(images) and isinstance(images[0], (str, Path))
    batches = torch.utils.data.DataLoader(images, batch_size, collate_fn=partial(read_images, resize=resize),
                                          num_workers=num_workers) if files else \
        [list(images[i:i + batch_size]) for i in range(0, len(images), batch_size)]
    feats, skipped = [], []
    with tqdm(total=len(images), unit="img", file=sys.stderr, disable=not progress) as bar:
        for batch in batches:
            skipped += [b for b in batch if not torch.is_tensor(b)]
            batch = [b for b in batch if torch.is_tensor(b)]
            if batch:
                feats.append(extractor(batch).double().cpu())
            bar.update(len(batch))
    if skipped:
        warnings.warn(f"skipped {len(skipped)} unreadable image(s), e.g. {skipped[0]}", stacklevel=2)
    if not feats:
        raise ValueError("no readable images")
    return torch.cat(feats).numpy()

# -----------------------------------------------------------------------------
# The metrics


def compute_stats(images_or_dir, extractor=None, batch_size=50, num_workers=0, resize=None, progress=True):
    """(mu, sigma) of the features, float64, as pytorch-fid's calculate_activation_statistics. extractor=None:
    pool3 of the published Inception."""
    extractor = extractor or inception_extractor(load_inception())
    act = features(images_or_dir, extractor, batch_size, num_workers, resize, progress)
    n, d = act.shape
    if n < 2:
        raise ValueError(f"{n} image: a covariance needs at least 2")
    if n < d:
        warnings.warn(f"FID from {n} images < {d} feature dimensions: the covariance is singular and the FID biased "
                      f"upwards; compare only with FIDs from as many images (the paper: 30,000)", stacklevel=2)
    return act.mean(0), np.cov(act, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """d^2 = |mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)), FID eq. (6), exactly as pytorch-fid computes it."""
    mu1, mu2, sigma1, sigma2 = np.atleast_1d(mu1), np.atleast_1d(mu2), np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"statistics differ in shape: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs "
                         f"{sigma2.shape}")
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():  # singular product (old scipy gives inf/nan): regularise, as pytorch-fid
        print(f"fid calculation produces singular product; adding {eps} to diagonal of cov estimates", file=sys.stderr)
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):  # round-off gives a tiny imaginary part; a large one means broken statistics
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"imaginary component {np.max(np.abs(covmean.imag))} in sqrtm(sigma1 sigma2)")
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def save_stats(path, mu, sigma):
    """pytorch-fid's .npz (savez_compressed, keys mu and sigma), written to a temporary name and then renamed; `.npz`
    is appended to a path without it, as numpy does."""
    path = Path(path) if str(path).endswith(".npz") else Path(f"{path}.npz")
    tmp = path.with_name(f".{path.name}.tmp.npz")
    np.savez_compressed(tmp, mu=mu, sigma=sigma)
    os.replace(tmp, path)


def load_stats(path, dims=None):
    try:
        with np.load(path, allow_pickle=False) as f:
            mu, sigma = f["mu"][:].astype(np.float64), f["sigma"][:].astype(np.float64)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"{path}: not a statistics file with arrays mu and sigma ({e})") from e
    if mu.ndim != 1 or sigma.shape != mu.shape * 2 or dims and len(mu) != dims:
        raise ValueError(f"{path}: mu {mu.shape} and sigma {sigma.shape} are not {dims or 'd'}-d statistics")
    return mu, sigma


def inception_score(logits, splits=10):
    """IS as torch-fidelity's isc_features_to_metric: rows shuffled with RandomState(2020), float64, `splits`
    chunks, exp(mean KL(p(y|x) || p(y))) per chunk -> (mean, population std) over chunks."""
    logits = torch.as_tensor(np.asarray(logits))[np.random.RandomState(2020).permutation(len(logits))].double()
    n, scores = len(logits), []
    if n < splits:
        raise ValueError(f"{n} images for {splits} splits")
    for i in range(splits):
        chunk = logits[i * n // splits:(i + 1) * n // splits]
        p, log_p = chunk.softmax(1), chunk.log_softmax(1)
        log_py = p.mean(0, keepdim=True).log()  # the marginal p(y) of this chunk
        scores.append((p * (log_p - log_py)).sum(1).mean().exp().item())
    return float(np.mean(scores)), float(np.std(scores))

# -----------------------------------------------------------------------------
# CLIP: the image tower (ViT) beside clip_text's text tower, the two projections, and the CLIP score


@dataclass(frozen=True)
class CLIPVisionConfig:  # transformers' CLIPVisionConfig names
    hidden_size: int = 1024           # ViT-L/14
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    intermediate_size: int = 4096
    hidden_act: str = "quick_gelu"    # OpenAI's; LAION's open_clip models (ViT-g-14) use exact GELU
    layer_norm_eps: float = 1e-5
    image_size: int = 224
    patch_size: int = 14


@dataclass(frozen=True)
class CLIPConfig:
    text: clip_text.CLIPTextConfig = clip_text.SD_V1
    vision: CLIPVisionConfig = CLIPVisionConfig()
    projection_dim: int = 768


CLIP_PRESETS = {
    "vit-l-14": CLIPConfig(),  # openai/clip-vit-large-patch14, whose text tower is SD v1's text encoder
    # open_clip ViT-g-14: width 1408, head width 88, mlp_ratio 4.3637 -> 6144
    "vit-g-14": CLIPConfig(replace(clip_text.SD_V1, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                   intermediate_size=4096, hidden_act="gelu"),
                           CLIPVisionConfig(1408, 40, 16, 6144, "gelu"), 1024),
    "tiny-test": CLIPConfig(clip_text.PRESETS["tiny-test"], CLIPVisionConfig(48, 2, 4, 96, image_size=32,
                                                                             patch_size=8), 16),
}


class CLIPVisionEmbeddings(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.randn(cfg.hidden_size) * cfg.hidden_size ** -0.5)
        self.patch_embedding = nn.Conv2d(3, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.position_embedding = nn.Embedding((cfg.image_size // cfg.patch_size) ** 2 + 1, cfg.hidden_size)

    def forward(self, pixels):
        x = self.patch_embedding(pixels).flatten(2).transpose(1, 2)  # (B, patches, D)
        x = torch.cat([self.class_embedding.expand(len(x), 1, -1), x], 1)  # the [class] token first
        return x + self.position_embedding.weight


class CLIPVisionTransformer(nn.Module):
    """Mirrors transformers `CLIPVisionTransformer`: patches + [class], pre-LN, encoder, LN of the [class] token."""

    def __init__(self, cfg):
        super().__init__()
        self.embeddings = CLIPVisionEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)  # sic: the official name
        self.encoder = nn.Module()
        # clip_text's encoder layers without the causal mask: every image patch sees every other
        self.encoder.layers = nn.ModuleList([clip_text.CLIPEncoderLayer(cfg, causal=False)
                                             for _ in range(cfg.num_hidden_layers)])
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, pixels):
        x = chain(self.pre_layrnorm(self.embeddings(pixels)), *self.encoder.layers)
        return self.post_layernorm(x[:, 0])


class CLIPModel(nn.Module):
    """Both towers and their projections. Mirrors transformers `CLIPModel`; load_state_dict takes its names (the text
    tower is clip_text.CLIPTextModel, whose load hook adds the `text_model.` it nests once more)."""

    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.cfg = cfg
        self.text_model = clip_text.CLIPTextModel(cfg.text)
        self.vision_model = CLIPVisionTransformer(cfg.vision)
        self.visual_projection = nn.Linear(cfg.vision.hidden_size, cfg.projection_dim, bias=False)
        self.text_projection = nn.Linear(cfg.text.hidden_size, cfg.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(2.6592))  # log(1 / 0.07); unused by the CLIP score

    def get_image_features(self, pixels):
        return self.visual_projection(self.vision_model(pixels.to(self.visual_projection.weight)))

    def get_text_features(self, ids):
        ids = ids.to(self.visual_projection.weight.device)
        h = self.text_model(ids)
        # the end-of-text token's state: its id (49407) is the largest, so argmax finds the first one
        return self.text_projection(h[torch.arange(len(h)), ids.argmax(-1)])


def clip_preprocess(image, size=224):
    """open_clip's eval transform (torchvision Resize + CenterCrop on PIL): the shorter side to `size` with PIL bicubic,
    the centre crop, x / 255, OpenAI's mean and std. RGB conversion comes first here, last in open_clip (where a
    palette image is therefore resized with PIL's nearest filter)."""
    w, h = image.size
    if min(w, h) != size:
        image = image.resize((size, int(size * h / w)) if w <= h else (int(size * w / h), size), Image.BICUBIC)
    w, h = image.size
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    x = torch.from_numpy(np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.float32) / 255)
    mean, std = torch.tensor([0.48145466, 0.4578275, 0.40821073]), torch.tensor([0.26862954, 0.26130258, 0.27577711])
    return ((x - mean) / std).permute(2, 0, 1)


def openai_tokenizer():
    vocab = clip_text.find_openai_vocab()
    if vocab is None:
        raise ValueError("no CLIP vocabulary: pip install --no-deps clip-anytorch (bpe_simple_vocab_16e6.txt.gz)")
    return clip_text.Tokenizer(vocab)


@torch.no_grad()
def clip_score(model, images, texts, tokenizer=None, batch_size=32):
    """Mean over pairs of cos(image, text) of L2-normalised projected features: no x100, no clamp at 0 (the paper's
    eval_clip_score.py). images: paths or PIL images; tokenizer: a clip_text.Tokenizer (default: OpenAI's vocab)."""
    if len(images) != len(texts) or not texts:
        raise ValueError(f"need one text per image, got {len(images)} images and {len(texts)} texts")
    tokenizer = openai_tokenizer() if tokenizer is None else tokenizer
    scores = []
    for i in range(0, len(texts), batch_size):
        ims = [im if isinstance(im, Image.Image) else open_rgb(im) for im in images[i:i + batch_size]]
        pixels = torch.stack([clip_preprocess(im.convert("RGB"), model.cfg.vision.image_size) for im in ims])
        img = F.normalize(model.get_image_features(pixels).float(), dim=-1)
        txt = F.normalize(model.get_text_features(tokenizer(texts[i:i + batch_size])).float(), dim=-1)
        scores.append((img * txt).sum(-1).double().cpu())
    return float(torch.cat(scores).mean())


# open_clip name <-> transformers name; a `{}` is a layer number. The attention's packed in_proj and the two
# projections (stored transposed, used as x @ proj) are tensor rules in the functions below.
OPEN_CLIP_NAMES = [("visual.conv1.", "vision_model.embeddings.patch_embedding."),
                   ("visual.class_embedding", "vision_model.embeddings.class_embedding"),
                   ("visual.positional_embedding", "vision_model.embeddings.position_embedding.weight"),
                   ("visual.ln_pre.", "vision_model.pre_layrnorm."),
                   ("visual.ln_post.", "vision_model.post_layernorm."),
                   ("visual.transformer.resblocks.{}.", "vision_model.encoder.layers.{}."),
                   ("token_embedding.", "text_model.embeddings.token_embedding."),
                   ("positional_embedding", "text_model.embeddings.position_embedding.weight"),
                   ("transformer.resblocks.{}.", "text_model.encoder.layers.{}."),
                   ("ln_final.", "text_model.final_layer_norm."), ("logit_scale", "logit_scale")]
BLOCK_NAMES = [("ln_1.", "layer_norm1."), ("ln_2.", "layer_norm2."), ("mlp.c_fc.", "mlp.fc1."),
               ("mlp.c_proj.", "mlp.fc2."), ("attn.out_proj.", "self_attn.out_proj.")]
PROJECTIONS = {"visual.proj": "visual_projection.weight", "text_projection": "text_projection.weight"}


def open_clip_to_hf(sd):
    """open_clip's state dict -> transformers' names (hf_to_open_clip: back). in_proj_* packs q, k, v (open_clip's
    blocks run torch's nn.MultiheadAttention); visual.proj and text_projection are stored transposed (x @ proj)."""
    out = {}
    for k, v in sd.items():
        if k in PROJECTIONS:
            out[PROJECTIONS[k]] = v.T
        elif k != "attn_mask":  # a causal-mask buffer in old open_clip files
            k = rename(k, OPEN_CLIP_NAMES)
            head, _, tail = k.partition(".layers.")
            if tail:  # inside a block: e.g. "3.attn.in_proj_weight"
                n, _, name = tail.partition(".")
                if name.startswith("attn.in_proj_"):  # packed q, k, v
                    for p, t in zip("qkv", v.chunk(3)):
                        out[f"{head}.layers.{n}.self_attn.{p}_proj.{name.rsplit('_', 1)[1]}"] = t
                    continue
                k = f"{head}.layers.{n}." + rename(name, BLOCK_NAMES)
            out[k] = v
    return out


def hf_to_open_clip(sd):
    back, out = {v: k for k, v in PROJECTIONS.items()}, {}
    for k, v in sd.items():
        head, _, tail = k.partition(".layers.")
        n, _, name = tail.partition(".")
        if k in back:
            out[back[k]] = v.T
        elif name.startswith(("self_attn.q_proj.", "self_attn.k_proj.", "self_attn.v_proj.")):
            kind = name.rsplit(".", 1)[1]  # weight or bias
            if name.startswith("self_attn.q_proj."):  # packed once, in torch's MultiheadAttention order q, k, v
                packed = torch.cat([sd[f"{head}.layers.{n}.self_attn.{p}_proj.{kind}"] for p in "qkv"])
                out[rename(f"{head}.layers.{n}.", OPEN_CLIP_NAMES, reverse=True) + f"attn.in_proj_{kind}"] = packed
        else:
            k = f"{head}.layers.{n}." + rename(name, BLOCK_NAMES, reverse=True) if tail else k
            out[rename(k, OPEN_CLIP_NAMES, reverse=True)] = v
    return out


def clip_file(name=CLIP_REPO):
    """The weights file of a CLIP model: `name` itself, the first of the known names in a folder, or in a hub repo
    (fetched with huggingface_hub into its cache)."""
    path, names = Path(name), ["open_clip_model.safetensors", "model.safetensors", "open_clip_pytorch_model.bin",
                               "pytorch_model.bin"]
    if path.is_dir():
        return next((path / n for n in names if (path / n).exists()), path / names[0])
    if path.exists():
        return path
    if path.is_absolute() or name.startswith("."):  # a path, not a hub repo
        raise OSError(f"{name}: no such file or folder")
    why = None
    for n in names:  # convert_weights.snapshot: a hub out of reach is one error and a look in the cache, not retries
        try:
            folder = convert_weights.snapshot(name, [n])  # its other errors (gated, no such repo) are OSErrors too
        except ConnectionError as e:  # out of reach, and not in the cache
            why = why or e
            continue
        if (folder / n).is_file():
            return folder / n
    if why:
        raise OSError(f"cannot fetch CLIP weights from {name} ({why}), and none of {', '.join(names)} is in the hub "
                      f"cache")
    raise OSError(f"{name} holds none of {', '.join(names)}")


def load_clip(name=CLIP_REPO, device="cpu", dtype=torch.float32, preset=None):
    """A CLIP model (clip_file's) in the transformers or the open_clip layout; the preset is recognised from the
    vision width (1024: L/14, 1408: g/14)."""
    path = clip_file(name)
    sd = convert_weights.read_file(path, dtype)[0]
    if "visual.conv1.weight" in sd:
        sd = open_clip_to_hf(sd)
    sd = {k: v for k, v in sd.items() if not k.endswith("position_ids")}
    width = sd.get("vision_model.embeddings.patch_embedding.weight", torch.empty(0)).shape[0]
    preset = preset or {1024: "vit-l-14", 1408: "vit-g-14"}.get(width)
    if preset is None:
        raise ValueError(f"{path}: not a CLIP ViT-L/14 or ViT-g/14 (vision width {width}); name a preset")
    model = CLIPModel(CLIP_PRESETS[preset])
    model.load_state_dict(sd, strict=True)
    return model.to(device, dtype).eval()

# -----------------------------------------------------------------------------
# `coco`: generate one image per prompt as the paper did, then score. Resumable and shardable.


def read_prompts(path):
    """metadata.csv (header file_name,text) -> [(file_name, text)]; a bad row is skipped and counted."""
    rows, bad, seen = [], [], set()
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not {"file_name", "text"} <= set(reader.fieldnames or ()):
            raise ValueError(f"{path}: the header must name the columns file_name and text, got {reader.fieldnames}")
        for row in reader:
            name, text = row.get("file_name") or "", row.get("text") or ""
            if None in row or not text.strip() or Path(name).name != name or not name or name in seen:
                bad.append(reader.line_num)  # extra fields, no text, a path instead of a name, or a repeated name
                continue
            seen.add(name)
            rows.append((name, text))
    if bad:
        print(f"{path}: skipped {len(bad)} bad row(s), on line(s) {bad[:10]}", file=sys.stderr)
    return rows, len(bad)


def write_atomic(path, write):
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def generate(pipe, prompts, out, s, device, dtype, rank=0, world=1):
    """Batches of s["batch"] prompts, rank's contiguous share of them; each finished batch is written, then the
    generator's state with it (progress-<rank>of<world>.json), so a run killed at any moment continues exactly."""
    import sampler  # imported here: scoring alone needs no U-Net code
    batches = [prompts[i:i + s["batch"]] for i in range(0, len(prompts), s["batch"])]
    first, end = rank * len(batches) // world, (rank + 1) * len(batches) // world
    g = torch.Generator(device).manual_seed(s["seed"])  # on the device, as the official InferencePipeline
    state_file = out / f"progress-{rank}of{world}.json"
    if state_file.exists():
        state = json.loads(state_file.read_text())
        if state["settings"] != s:
            raise ValueError(f"{out} holds a run with other settings ({state['settings']}); use another --out")
        first = state["next_batch"]
        g.set_state(torch.frombuffer(bytearray(base64.b64decode(state["generator"])), dtype=torch.uint8))
    else:  # sharded: replay the noise draws of the batches before ours (PNDM draws only the initial noise)
        for b in range(first):
            sampler.randn((len(batches[b]), pipe.unet_cfg.in_channels, s["size"] // 8, s["size"] // 8), g, device,
                          dtype)  # the very call txt2img makes
    for b in tqdm(range(first, end), initial=first, total=end, unit="batch", file=sys.stderr, disable=first >= end):
        r = sampler.txt2img(pipe, [t for _, t in batches[b]], negative_prompt="", steps=s["steps"],
                            guidance=s["guidance"], height=s["size"], width=s["size"], generator=g, sampler="pndm",
                            progress=False)
        for (name, _), im in zip(batches[b], r.pil()):  # JPEG q75, reopened, PIL bicubic to 256, JPEG again
            write_atomic(out / "im512" / name, lambda p: im.save(p, format="JPEG", quality=75))
            with Image.open(out / "im512" / name) as big:
                small = big.resize((256, 256), Image.BICUBIC)
            write_atomic(out / "im256" / name, lambda p: small.save(p, format="JPEG", quality=75))
        state = dict(settings=s, next_batch=b + 1, generator=base64.b64encode(g.get_state().numpy()).decode())
        write_atomic(state_file, lambda p: p.write_text(json.dumps(state)))


def coco(args):
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    if world > 1 and device == "cuda":
        device = f"cuda:{os.environ.get('LOCAL_RANK', rank)}"
    dtype = torch.float16 if torch.device(device).type == "cuda" else torch.float32
    if args.random_weights:
        print("*" * 78 + "\n*** SMOKE RUN: RANDOM U-Net, VAE, Inception and CLIP weights; the scores mean nothing ***\n"
              + "*" * 78, file=sys.stderr)
    prompts, bad = read_prompts(args.prompts) if args.prompts else (
        [(f"{i:04d}.jpg", p) for i, p in enumerate(["a cat", "a red bus", "two dogs", "a bowl of fruit"])], 0)
    named = {}  # saved as JPEG under the stem: of x.png and x.jpg, the second is a bad row (one file for two rows)
    for name, text in prompts:
        named.setdefault(Path(name).stem + ".jpg", text)
    if len(named) < len(prompts):
        print(f"{args.prompts}: skipped {len(prompts) - len(named)} row(s) whose image, saved as NAME.jpg, would "
              f"overwrite an earlier row's", file=sys.stderr)
    bad += len(prompts) - len(named)
    prompts = list(named.items())[:args.limit]
    real = load_stats(args.real_stats, 2048) if args.real_stats else None  # a bad file fails now, not after hours
    if not prompts:
        sys.exit(f"error: no prompts in {args.prompts}")
    size = args.size or (64 if args.random_weights else 512)
    s = dict(prompts=str(args.prompts), weights="RANDOM" if args.random_weights else str(args.weights),
             seed=args.seed, batch=args.batch, steps=args.steps, guidance=args.guidance, size=size, world=world)
    if world > 1:  # each rank's share of the batches depends on their count: a sharded resume keeps --limit
        s["count"] = len(prompts)
    if not args.random_weights and rank == 0:  # what scoring needs, found before hours of generation, not after
        tokenizer, inception_path, clip_path = openai_tokenizer(), inception_file(args.inception_weights), \
            clip_file(args.clip_model)
    out = Path(args.out)
    for d in ("im512", "im256"):
        (out / d).mkdir(parents=True, exist_ok=True)
    if world > 1:
        torch.distributed.init_process_group("gloo")  # only for the barrier below
    import sampler
    pipe = sampler.random_pipeline("tiny-test") if args.random_weights else \
        convert_weights.load_pipeline(args.weights, dtype=dtype, device=device)
    generate(pipe.to(device, dtype), prompts, out, s, device, dtype, rank, world)
    if world > 1:
        torch.distributed.barrier()
    if rank:
        return
    torch.manual_seed(0)  # random Inception and CLIP weights, when asked for, are the same on every run
    inception = random_inception() if args.random_weights else load_inception(inception_path)
    inception.to(device)
    clip = CLIPModel(CLIP_PRESETS["tiny-test"]) if args.random_weights else load_clip(clip_path, device)
    files = [out / "im256" / name for name, _ in prompts]
    kw = dict(batch_size=args.batch_size, num_workers=args.num_workers)
    mu, sigma = compute_stats(files, inception_extractor(inception), **kw)
    real = real or compute_stats(torch.randint(0, 256, (8, 3, 64, 64), dtype=torch.uint8),  # smoke run: noise
                                 inception_extractor(inception), progress=False)
    logits = features(sorted(files), inception_extractor(inception, "isc"), **kw)  # as --isc and torch-fidelity
    is_mean, is_std = inception_score(logits, splits=min(10, len(files)))  # torch-fidelity's 10, fewer in smoke runs
    tokenizer = pipe.tokenizer if args.random_weights else tokenizer  # else OpenAI's vocabulary, as open_clip's
    scores = dict(fid=frechet_distance(mu, sigma, *real), isc_mean=is_mean, isc_std=is_std,
                  clip_score=clip_score(clip, files, [t for _, t in prompts], tokenizer, args.batch_size),
                  images=len(files),
                  bad_prompt_rows=bad, random_weights=args.random_weights, settings=s,
                  real_stats=str(args.real_stats), clip_model="RANDOM" if args.random_weights else args.clip_model,
                  versions=dict(python=platform.python_version(), torch=torch.__version__, numpy=np.__version__,
                                scipy=scipy.__version__, pillow=PIL.__version__, device=device, dtype=str(dtype)))
    write_atomic(out / "scores.json", lambda p: p.write_text(json.dumps(scores, indent=1)))
    print(f"FID {scores['fid']:.2f}  IS {is_mean:.2f} +- {is_std:.2f}  CLIP {scores['clip_score']:.4f}  "
          f"({len(files)} images{', RANDOM WEIGHTS' if args.random_weights else ''}) -> {out / 'scores.json'}")

# -----------------------------------------------------------------------------
# Command line:  python fid.py DIR_OR_NPZ DIR_OR_NPZ | --save-stats DIR OUT.npz | --isc DIR | --clip-score DIR | coco


def main(argv=None):
    import unet  # where the memory setting lives; scoring itself uses no U-Net code
    unet.keep_freed_memory()  # this process is ours: no page faults on every batch's tensors
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.
                                 ArgumentDefaultsHelpFormatter, epilog="The MS-COCO evaluation: fid.py coco --help")
    if argv[:1] == ["coco"]:
        ap.add_argument("coco")
        ap.add_argument("--prompts", help="metadata.csv (file_name,text); default with --random-weights: 4 prompts")
        ap.add_argument("--weights", help="the model to evaluate (a diffusers folder or a single file)")
        ap.add_argument("--real-stats", help="real_im256.npz (the 40,504 val2014 images at 256x256)")
        ap.add_argument("--out", required=True)
        ap.add_argument("--limit", type=int, help="only the first N prompts")
        ap.add_argument("--batch", type=int, default=1, help="prompts per U-Net batch; the paper's images need 1")
        ap.add_argument("--seed", type=int, default=1234)
        ap.add_argument("--steps", type=int, default=25)
        ap.add_argument("--guidance", type=float, default=7.5)
        ap.add_argument("--size", type=int, help="image side (default 512; 64 with --random-weights)")
    else:
        ap.add_argument("path", nargs="+", help="two folders or .npz files; one folder with --isc / --clip-score")
        ap.add_argument("--save-stats", action="store_true", help="write the statistics of path[0] to path[1]")
        ap.add_argument("--isc", action="store_true", help="the Inception Score of a folder")
        ap.add_argument("--clip-score", action="store_true", help="the CLIP score of a folder against --prompts")
        ap.add_argument("--prompts", help="metadata.csv (file_name,text) for --clip-score")
        ap.add_argument("--resize", type=int, help="PIL-bicubic-resize every image to N x N first (the paper: 256)")
    ap.add_argument("--batch-size", type=int, default=50, help="images per Inception / CLIP batch")
    ap.add_argument("--num-workers", type=int, default=min(8, os.cpu_count() or 1),
                    help="image-reading processes (Inception)")
    ap.add_argument("--device", default="auto", help="auto: cuda if available, else cpu")
    ap.add_argument("--inception-weights", help="pt_inception-2015-12-05-6726825d.pth (default: torch.hub's cache)")
    ap.add_argument("--clip-model", default=CLIP_REPO, help="hub repo, folder or file (transformers/open_clip layout)")
    ap.add_argument("--random-weights", action="store_true", help="offline smoke run: RANDOM networks")
    args = ap.parse_args(argv)
    try:
        if argv[:1] == ["coco"]:
            if not args.random_weights and not (args.prompts and args.weights and args.real_stats):
                ap.error("coco needs --prompts, --weights and --real-stats (or --random-weights)")
            bad = [f"--{k} {getattr(args, k)}" for k in ("limit", "batch", "steps", "size")
                   if getattr(args, k) is not None and getattr(args, k) < 1]
            if bad or not math.isfinite(args.guidance):  # nan would silently turn guidance off
                ap.error(f"need --limit, --batch, --steps, --size >= 1 and a finite --guidance: "
                         f"{', '.join(bad) or f'--guidance {args.guidance}'}")
            return coco(args)
        device = args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
        n = 1 if args.isc or args.clip_score else 2
        if len(args.path) != n:
            ap.error(f"expected {n} path(s), got {len(args.path)}")
        missing = [p for p in args.path[:1 if args.save_stats else n] if not Path(p).exists()]
        if missing:  # before the networks load: a typo costs nothing
            ap.error(f"no such folder or file: {', '.join(missing)}")
        if args.random_weights:
            print("*** RANDOM Inception / CLIP weights: the numbers mean nothing ***", file=sys.stderr)
            torch.manual_seed(0)
        if args.clip_score:
            if not args.prompts or args.resize:  # the paper scores the im256/ files as they are
                ap.error("--clip-score needs --prompts metadata.csv, and takes no --resize")
            prompts = read_prompts(args.prompts)[0]
            files = [Path(args.path[0]) / name for name, _ in prompts]
            missing = [f for f in files if not f.exists()]
            if missing:
                sys.exit(f"error: {len(missing)} image(s) named in {args.prompts} are missing, e.g. {missing[0]}")
            clip = CLIPModel(CLIP_PRESETS["tiny-test"]) if args.random_weights else load_clip(args.clip_model, device)
            return print(f"CLIP score: {clip_score(clip, files, [t for _, t in prompts], None, args.batch_size):.4f}")
        inception = (random_inception() if args.random_weights else load_inception(args.inception_weights)).to(device)
        if args.isc:
            logits = features(args.path[0], inception_extractor(inception, "isc"), args.batch_size,
                              args.num_workers, args.resize)
            return print("Inception Score: {:.4f} +- {:.4f}".format(*inception_score(logits)))
        kw = dict(batch_size=args.batch_size, num_workers=args.num_workers, resize=args.resize)
        if args.save_stats:
            return save_stats(args.path[1], *compute_stats(args.path[0], inception_extractor(inception), **kw))
        stats = {p: load_stats(p, 2048) for p in args.path if p.endswith(".npz")}  # read first: fail before work
        (mu1, s1), (mu2, s2) = [stats.get(p) or compute_stats(p, inception_extractor(inception), **kw)
                                for p in args.path]
        print(f"FID: {frechet_distance(mu1, s1, mu2, s2):.4f}")
    except (OSError, ValueError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
