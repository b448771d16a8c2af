"""
Benchmarks: minisd vs diffusers, side by side in one run, on the same random weights. Prints ratios.
Results go in BENCHMARKS.md. Needs the dev requirements (diffusers is the reference, never a run-time need).

  python bench.py                         # one U-Net step, sd-v1, fp32, CPU, batch 2, 64x64 latent, 2 threads
  python bench.py --preset bk-small --reps 5 --device cuda --dtype float16
  python bench.py --qkv                   # separate vs fused q/k/v projections at SD v1's attention shapes
  python bench.py --load                  # load a saved diffusers folder (random sd-v1 weights): time, peak RSS
  python bench.py --txt2img --preset bk-small --size 256 --steps 10   # whole text-to-image run, per stage
"""
import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from convert_weights import DTYPES
from unet import PRESETS, Attention, UNet, attention



def build(args, which):
    """which = "minisd" or "diffusers": that model alone, as a user builds it (for memory); "both": ours with
    seeded random weights and diffusers' sharing the very same tensors (for time and a parity check)."""
    torch.manual_seed(0)
    cfg = PRESETS[args.preset]
    to = dict(device=args.device, dtype=DTYPES[args.dtype])
    if which != "diffusers":
        ours = UNet(cfg).to(**to).eval()
        if which == "minisd":
            return cfg, {"minisd": ours}
    from diffusers import UNet2DConditionModel
    d = {k: v for k, v in cfg.to_diffusers().items() if k[0] != "_"}
    if which == "diffusers":
        ref = UNet2DConditionModel(**d)  # cast only when asked: diffusers warns about .to(dtype)
        return cfg, {"diffusers": (ref if to == dict(device="cpu", dtype=torch.float32) else ref.to(**to)).eval()}
    with torch.device("meta"):
        ref = UNet2DConditionModel(**d)
    ref.load_state_dict(ours.state_dict(), strict=True, assign=True)
    return cfg, {"minisd": ours, "diffusers": ref.eval()}


def step_inputs(cfg, args):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, cfg.in_channels, args.latent, args.latent, generator=g)
    ctx = torch.randn(args.batch, 77, cfg.cross_attention_dim, generator=g)
    t = torch.full((args.batch,), 500)
    return (v.to(args.device, DTYPES[args.dtype]) if v.is_floating_point() else v.to(args.device) for v in (x, t, ctx))


def call(name, model, x, t, ctx):
    out = model(x, t, ctx)
    return out if name == "minisd" else out.sample


def sync(args):
    if args.device == "cuda":
        torch.cuda.synchronize()


def bench_unet(args):
    cfg, models = build(args, "both")
    x, t, ctx = step_inputs(cfg, args)
    times = {name: [] for name in models}
    with torch.inference_mode():
        outs = {name: call(name, m, x, t, ctx) for name, m in models.items()}  # warm-up, and a parity check
        err = ((outs["minisd"] - outs["diffusers"]).abs().max() / outs["diffusers"].abs().max()).item()
        for _ in range(args.reps):  # interleaved, so drift in machine speed hits both alike
            for name, m in models.items():
                sync(args)
                t0 = time.perf_counter()
                call(name, m, x, t, ctx)
                sync(args)
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"U-Net step, {args.preset}, {args.dtype}, {args.device}, batch {args.batch}, {args.latent}x{args.latent} "
          f"latent, {torch.get_num_threads()} threads, median of {args.reps} (max relative difference {err:.1e})")
    for name, v in times.items():
        print(f"  {name:10s} {med[name]:8.3f} s   (runs: {', '.join(f'{s:.3f}' for s in v)})")
    print(f"  speed-up of minisd over diffusers: {med['diffusers'] / med['minisd']:.3f}x")
    if args.device == "cpu":  # peak memory: each in a fresh process, since RSS never shrinks
        peak = {}
        for name in models:
            cmd = [sys.executable, __file__, "--peak-rss", name] + [f"--{k}={v}" for k, v in (
                ("preset", args.preset), ("batch", args.batch), ("latent", args.latent), ("threads", args.threads))]
            peak[name] = float(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.split()[-1])
            print(f"  {name:10s} peak RSS, build + 1 step: {peak[name]:.2f} GB")
        print(f"  peak memory minisd / diffusers: {peak['minisd'] / peak['diffusers']:.3f}")


def peak_gb():
    """This process's peak resident memory. Not ru_maxrss: Linux carries that over from the parent through fork and
    exec, so a child spawned by a process holding a model would report the parent's peak (VmHWM is per process)."""
    with open("/proc/self/status") as f:
        return int(f.read().split("VmHWM:")[1].split()[0]) / 2**20  # kB -> GB


def peak_rss(args):
    cfg, models = build(args, args.peak_rss)
    x, t, ctx = step_inputs(cfg, args)
    with torch.inference_mode():
        for name, m in models.items():
            call(name, m, x, t, ctx)
    print(peak_gb())


def bench_qkv(args):
    """Is one matmul over concatenated to_q/to_k/to_v weights faster than three? (unet.py keeps three.)"""
    def separate(m, x, c):
        return m.to_out[0](attention(m.to_q(x), m.to_k(c), m.to_v(c), m.heads))

    def fused(m, x, c):  # the weights pre-concatenated once, as an inference engine would cache them
        if c is x:
            q, k, v = F.linear(x, m.w_qkv).chunk(3, dim=-1)
        else:
            q, (k, v) = m.to_q(x), F.linear(c, m.w_kv).chunk(2, dim=-1)
        return m.to_out[0](attention(q, k, v, m.heads))

    print(f"attention layer, batch {args.batch}, {args.dtype}, {args.device}, median of {args.reps}")
    for C, L in [(320, 4096), (640, 1024), (1280, 256), (1280, 64)]:
        for cross in (False, True):
            m = Attention(C, 8, 768 if cross else None).to(args.device, DTYPES[args.dtype]).eval()
            m.w_kv = torch.cat([m.to_k.weight, m.to_v.weight]).detach()
            m.w_qkv = None if cross else torch.cat([m.to_q.weight, m.w_kv]).detach()
            x = torch.randn(args.batch, L, C).to(args.device, DTYPES[args.dtype])
            c = torch.randn(args.batch, 77, 768).to(x) if cross else x
            times = {"separate": [], "fused": []}
            with torch.inference_mode():
                for _ in range(args.reps + 1):
                    for name, f in (("separate", separate), ("fused", fused)):
                        sync(args)
                        t0 = time.perf_counter()
                        f(m, x, c)
                        sync(args)
                        times[name].append(time.perf_counter() - t0)
            s, f = (statistics.median(times[k][1:]) * 1e3 for k in ("separate", "fused"))
            print(f"  C={C:4d} tokens={L:4d} {'cross' if cross else 'self '}: separate {s:8.2f} ms, "
                  f"fused {f:8.2f} ms, fused speed-up {s / f:.3f}x")


def save_random_pipeline(preset, folder):
    """A full-size pipeline (U-Net `preset`, SD v1 VAE and CLIP) with seeded random weights, as a diffusers folder."""
    import dataclasses
    import convert_weights as cw
    from sampler import random_pipeline
    pipe = dataclasses.replace(random_pipeline(preset), scheduler_config=dict(cw.SD_V1_SCHEDULER))
    cw.to_diffusers(pipe, folder)
    return pipe


def load_once(which, folder, dtype):
    """One load in this (fresh) process; prints seconds and peak RSS in GB."""
    t0 = time.perf_counter()
    if which == "read":  # the floor: every byte of the weights files read once
        for f in sorted(Path(folder).glob("*/*.safetensors")):
            with open(f, "rb") as fh:
                while fh.read(1 << 24):
                    pass
    elif which == "minisd":
        import convert_weights as cw
        pipe = cw.load_pipeline(folder, dtype=DTYPES[dtype])
        sum(p.float().sum().item() for p in pipe.unet.parameters())  # touch every page: mmap defers the reads
    else:
        from diffusers import StableDiffusionPipeline
        pipe = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=DTYPES[dtype], local_files_only=True)
        sum(p.float().sum().item() for p in pipe.unet.parameters())
    seconds = time.perf_counter() - t0
    print(seconds, peak_gb())


def bench_load(args):
    """Load a whole pipeline from a diffusers folder (safetensors, fp32 on disk) in fresh processes, interleaved:
    minisd's load_pipeline (meta-device models, memory-mapped tensors assigned as they are) vs diffusers'
    StableDiffusionPipeline.from_pretrained, and the time to just read the files."""
    with tempfile.TemporaryDirectory() as folder:
        save_random_pipeline(args.preset, folder)
        size = sum(f.stat().st_size for f in Path(folder).glob("*/*.safetensors")) / 1e9
        runs = {"read": [], "minisd": [], "diffusers": []}
        for _ in range(args.reps):
            for which in runs:
                cmd = [sys.executable, __file__, "--load-once", which, folder, f"--dtype={args.dtype}"]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.split()
                runs[which].append((float(out[-2]), float(out[-1])))
    print(f"load a {args.preset} pipeline (U-Net + VAE + CLIP) from a diffusers folder, {size:.2f} GB of fp32 "
          f"safetensors, into {args.dtype}, CPU, warm page cache, median of {args.reps}, each in a fresh process")
    med = {k: (statistics.median(s for s, _ in v), max(m for _, m in v)) for k, v in runs.items()}
    for k, (s, m) in med.items():
        print(f"  {k:10s} {s:7.2f} s   peak RSS {m:5.2f} GB   (runs: {', '.join(f'{s:.2f}' for s, _ in runs[k])})")
    print(f"  speed-up of minisd over diffusers: {med['diffusers'][0] / med['minisd'][0]:.2f}x; minisd / reading "
          f"the files: {med['minisd'][0] / med['read'][0]:.2f}x; peak RSS minisd / weights in {args.dtype}: "
          f"{med['minisd'][1] / (size * (1 if args.dtype == 'float32' else 0.5)):.2f}")


def bench_txt2img(args):
    """A whole text-to-image run (text encoder, sampling loop, VAE decode) against diffusers' StableDiffusionPipeline
    on the same random weights and the same initial noise, alternating; per-stage times for minisd."""
    import convert_weights as cw
    from diffusers import StableDiffusionPipeline
    from sampler import txt2img
    with tempfile.TemporaryDirectory() as folder:
        save_random_pipeline(args.preset, folder)
        ours = cw.load_pipeline(folder, dtype=DTYPES[args.dtype], device=args.device)
        ref = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=DTYPES[args.dtype], local_files_only=True)
    ref = ref.to(args.device)
    ref.set_progress_bar_config(disable=True)
    prompt, f = "a photograph of an astronaut riding a horse", ours.vae_cfg.downsample_factor
    latents = torch.randn(1, 4, args.size // f, args.size // f, generator=torch.Generator().manual_seed(0))
    times, stages = {"minisd": [], "diffusers": []}, []
    for _ in range(args.reps + 1):  # the first round warms up and is not counted
        sync(args)
        t0 = time.perf_counter()
        r = txt2img(ours, prompt, steps=args.steps, height=args.size, width=args.size, latents=latents,
                    progress=False)
        sync(args)
        times["minisd"].append(time.perf_counter() - t0)
        stages.append(r.times)
        t0 = time.perf_counter()
        img = ref(prompt, num_inference_steps=args.steps, height=args.size, width=args.size,
                  latents=latents.to(args.device, DTYPES[args.dtype]), output_type="np").images
        sync(args)
        times["diffusers"].append(time.perf_counter() - t0)
    diff = (torch.from_numpy(img * 255).round() - r.images.float()).abs().max().item()
    med = {k: statistics.median(v[1:]) for k, v in times.items()}
    print(f"txt2img, {args.preset}, {args.size}x{args.size}, {args.steps} PNDM steps, guidance 7.5 (batch 2 in the "
          f"U-Net), {args.dtype}, {args.device}, {torch.get_num_threads()} threads, median of {args.reps} "
          f"(max pixel difference {diff:.0f}/255)")
    for k, v in times.items():
        print(f"  {k:10s} {med[k]:8.2f} s   (runs: {', '.join(f'{s:.2f}' for s in v[1:])})")
    print("  minisd stages: " + ", ".join(f"{k} {statistics.median(s[k] for s in stages[1:]):.2f} s"
                                          for k in stages[-1]))
    print(f"  speed-up of minisd over diffusers: {med['diffusers'] / med['minisd']:.3f}x")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--preset", default="sd-v1", choices=list(PRESETS))
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--latent", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (the CI machine has 2 cores)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--qkv", action="store_true", help="benchmark fused vs separate q/k/v projections")
    ap.add_argument("--load", action="store_true", help="benchmark loading a saved pipeline")
    ap.add_argument("--txt2img", action="store_true", help="benchmark a whole text-to-image run")
    ap.add_argument("--size", type=int, default=256, help="--txt2img: image side in pixels")
    ap.add_argument("--steps", type=int, default=10, help="--txt2img: sampling steps")
    ap.add_argument("--peak-rss", help=argparse.SUPPRESS)
    ap.add_argument("--load-once", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.peak_rss:
        peak_rss(args)
    elif args.load_once:
        load_once(*args.load_once, args.dtype)
    elif args.load:
        bench_load(args)
    elif args.txt2img:
        bench_txt2img(args)
    elif args.qkv:
        bench_qkv(args)
    else:
        bench_unet(args)
