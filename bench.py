"""
Benchmarks: minisd vs diffusers, side by side in one run, on the same random weights. Prints ratios.
Results go in BENCHMARKS.md. Needs the dev requirements (diffusers is the reference, never a run-time need).

  python bench.py                         # one U-Net step, sd-v1, fp32, CPU, batch 2, 64x64 latent, 2 threads
  python bench.py --preset bk-small --reps 5 --device cuda --dtype float16
  python bench.py --qkv                   # separate vs fused q/k/v projections at SD v1's attention shapes
"""
import argparse
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from unet import PRESETS, Attention, UNet, attention

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


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


def peak_rss(args):
    cfg, models = build(args, args.peak_rss)
    x, t, ctx = step_inputs(cfg, args)
    with torch.inference_mode():
        for name, m in models.items():
            call(name, m, x, t, ctx)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)  # kB -> GB


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


if __name__ == "__main__":
    ap = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--preset", default="sd-v1", choices=list(PRESETS))
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--latent", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (the CI machine has 2 cores)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=list(DTYPES))
    ap.add_argument("--qkv", action="store_true", help="benchmark fused vs separate q/k/v projections")
    ap.add_argument("--peak-rss", help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.peak_rss:
        peak_rss(args)
    elif args.qkv:
        bench_qkv(args)
    else:
        bench_unet(args)
