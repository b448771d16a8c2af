"""
Benchmarks: minisd vs diffusers, side by side in one run, on the same random weights. Prints ratios.
Results go in BENCHMARKS.md. Needs the dev requirements (diffusers is the reference, never a run-time need).

  python bench.py                         # one U-Net step, sd-v1, fp32, CPU, batch 2, 64x64 latent, 2 threads
  python bench.py --preset bk-small --reps 5 --device cuda --dtype float16
  python bench.py --preset bk-tiny --device cuda --dtype float16 --compile reduce-overhead  # both compiled alike
  python bench.py --preset bk-tiny --device cuda --dtype float16 --cuda-graph   # both replayed as CUDA graphs
  python bench.py --preset bk-tiny --dtype bfloat16 --guided   # a guided step: one latent with its two texts
  python bench.py --attention --dtype bfloat16   # our attention kernels (tiled, fused, native) vs SDPA, SD v1 shapes
  python bench.py --preset bk-base --dtype bfloat16 --fidelity 20   # bf16 against fp32 over 20 inputs (goal 2)
  python bench.py --qkv                   # separate vs fused q/k/v projections at SD v1's attention shapes
  python bench.py --load                  # load a saved diffusers folder (random sd-v1 weights): time, peak RSS
  python bench.py --txt2img --preset bk-small --size 256 --steps 10   # whole text-to-image run, per stage
  python bench.py --whole --preset bk-tiny --size 512 --steps 25 --reps 2  # the user's image: whole processes
  python bench.py --distill [--ckpt]      # one BK-SDM KD training step (bk-base from sd-v1), vs the official way
  python bench.py --distill --device cuda --latent 64 --batch 64 --dtype bfloat16 --ckpt   # the paper's setting
  python bench.py --fid [--score 1000 --gen 20]   # Inception images/s batched vs image by image; scoring; COCO run
--json FILE also writes the measurements, with the arguments and the machine, as JSON (the U-Net step, --fidelity,
--txt2img, --whole and --attention return theirs; the other modes write null as the result).
"""
import argparse
import importlib.metadata
import json
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from convert_weights import DTYPES
from sampler import native_bf16
from unet import PRESETS, Attention, UNet, attention, native_fits



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


def step_inputs(cfg, args, seed=1, dtype=None):
    """--guided: batch / 2 latents, each with two texts, as the samplers call the U-Net under guidance."""
    g, n = torch.Generator().manual_seed(seed), args.batch // 2 if args.guided else args.batch
    x = torch.randn(n, cfg.in_channels, args.latent, args.latent, generator=g)
    ctx = torch.randn(args.batch, 77, cfg.cross_attention_dim, generator=g)
    t = torch.full((n,), 500)
    dtype = dtype or DTYPES[args.dtype]
    return [v.to(args.device, dtype) if v.is_floating_point() else v.to(args.device) for v in (x, t, ctx)]


def call(name, model, x, t, ctx):
    if name == "minisd":
        return model(x, t, ctx)  # k texts per latent: the layers before the text run once (unet.UNet.forward)
    k = ctx.shape[0] // x.shape[0]
    if k > 1:  # --guided: diffusers' pipeline repeats the latent (and its timestep) for the texts
        x, t = torch.cat([x] * k), t.repeat(k)
    return model(x, t, ctx).sample


def sync(args):
    if args.device == "cuda":
        torch.cuda.synchronize()


def bench_unet(args):
    cfg, models = build(args, "both")
    x, t, ctx = step_inputs(cfg, args)
    times, compile_s = {name: [] for name in models}, {}
    with torch.inference_mode():
        if args.compile:  # both libraries compiled alike; the first call compiles, timed apart
            models = {name: torch.compile(m, mode=args.compile) for name, m in models.items()}
            for name, m in models.items():
                t0 = time.perf_counter()
                call(name, m, x, t, ctx)
                sync(args)
                compile_s[name] = time.perf_counter() - t0
                print(f"  {name:10s} torch.compile(mode={args.compile!r}): first call {compile_s[name]:.1f} s")
        steps = {name: partial(call, name, m) for name, m in models.items()}
        if args.cuda_graph:  # both libraries replayed as CUDA graphs alike (sampler.CUDAGraph)
            from sampler import CUDAGraph
            steps = {name: CUDAGraph(f) for name, f in steps.items()}
        # warm-up, and a parity check (a clone: reduce-overhead's CUDA graphs share one memory pool)
        outs = {name: f(x, t, ctx).clone() for name, f in steps.items()}
        err = ((outs["minisd"] - outs["diffusers"]).abs().max() / outs["diffusers"].abs().max()).item()
        for _ in range(args.reps):  # interleaved, so drift in machine speed hits both alike
            for name, f in steps.items():
                sync(args)
                t0 = time.perf_counter()
                f(x, t, ctx)
                sync(args)
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    how = (", compiled" if args.compile else "") + (", CUDA graphs" if args.cuda_graph else "") + \
        (", guided (a latent with its two texts)" if args.guided else "")
    print(f"U-Net step, {args.preset}, {args.dtype}, {args.device}{how}, "
          f"batch {args.batch}, {args.latent}x{args.latent} latent, {torch.get_num_threads()} threads, "
          f"median of {args.reps} (max relative difference {err:.1e})")
    for name, v in times.items():
        print(f"  {name:10s} {med[name]:8.4f} s   (runs: {', '.join(f'{s:.4f}' for s in v)})")
    print(f"  speed-up of minisd over diffusers: {med['diffusers'] / med['minisd']:.3f}x")
    result = dict(seconds=times, median=med, ratio=med["minisd"] / med["diffusers"], max_rel_diff=err,
                  first_call_s=compile_s)
    if args.device == "cpu" and not args.compile:  # peak memory: each in a fresh process, since RSS never shrinks
        peak = {}
        for name in models:
            cmd = [sys.executable, __file__, "--peak-rss", name] + [f"--{k}={v}" for k, v in (
                ("preset", args.preset), ("batch", args.batch), ("latent", args.latent), ("threads", args.threads),
                ("dtype", args.dtype))] + (["--guided"] if args.guided else [])
            peak[name] = float(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.split()[-1])
            print(f"  {name:10s} peak RSS, import + build + 1 step: {peak[name]:.2f} GB")
        print(f"  peak memory minisd / diffusers: {peak['minisd'] / peak['diffusers']:.3f}")
        result["peak_rss_gb"] = peak
    return result


def bench_fidelity(args):
    """Issue 12, goal 2's bound: the low-precision step (--dtype) against fp32 on the same seeded weights, over
    --fidelity inputs (seeds 1, 2, ...; seed 1 is the timed mode's input), each given to fp32 as it is and to the low
    precision rounded; ours and diffusers' alike. Both readings of "relative error": the whole output's, ||d|| /
    ||ref|| (goal 2's, as BENCHMARKS.md reads it), and the largest element's, max|d| / max|ref| (the parity tests')."""
    torch.manual_seed(0)
    exact = UNet(PRESETS[args.preset]).to(args.device).eval()  # build() draws the same weights, then casts them
    cfg, models = build(args, "both")
    readings = {"norm": lambda d, ref: d.norm() / ref.norm(), "max": lambda d, ref: d.abs().max() / ref.abs().max()}
    errs = {name: {k: [] for k in readings} for name in models}
    print(f"{args.preset}, {args.dtype} against float32, {args.device}, batch {args.batch}"
          f"{', guided' if args.guided else ''}, {args.latent}x{args.latent} latent, {args.fidelity} inputs")
    with torch.inference_mode():
        for seed in range(1, args.fidelity + 1):
            x, t, ctx = step_inputs(cfg, args, seed, torch.float32)
            ref = exact(x, t, ctx).double()
            low = [v.to(DTYPES[args.dtype]) if v.is_floating_point() else v for v in (x, t, ctx)]
            for name, m in models.items():
                d = call(name, m, *low).double() - ref
                for k, f in readings.items():
                    errs[name][k].append(f(d, ref).item())
            print(f"  input {seed:2d}: " + ", ".join(f"{name} {k} {v[-1]:.2e}" for name in errs
                                                       for k, v in errs[name].items()), flush=True)
    for name in errs:
        for k, v in errs[name].items():
            print(f"  {name:10s} {k:4s}: max {max(v):.2e}, median {statistics.median(v):.2e}, "
                  f"{sum(e > 2e-2 for e in v)} of {len(v)} above goal 2's 2e-2")
    return errs


def peak_gb():
    """This process's peak resident memory. Not ru_maxrss: Linux carries that over from the parent through fork and
    exec, so a child spawned by a process holding a model would report the parent's peak (VmHWM is per process)."""
    with open("/proc/self/status") as f:
        return int(f.read().split("VmHWM:")[1].split()[0]) / 2**20  # kB -> GB of 2^30 bytes, as BENCHMARKS counts


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


def bench_attention(args):
    """Issue 12, goal 6: our attention kernels against torch's SDPA at SD v1's shapes (512 px, batch 2, 8 heads):
    the tiled loop as it reads (eager), compiled into fused kernels (impl "fused"), and attention.c (impl
    "native": fp32 on AVX-512, bf16 on AMX), exactness against float64."""
    print(f"attention core, batch {args.batch} x 8 heads, {args.dtype}, {args.device}, "
          f"{torch.get_num_threads()} threads, median of {args.reps}; fused compiled per shape first (timed apart)")
    rows, dtype = [], DTYPES[args.dtype]
    for L, C in [(4096, 320), (1024, 640), (256, 1280), (64, 1280)]:
        for Lk in (L, 77):  # self-attention, then cross-attention to the 77 text tokens
            g = torch.Generator().manual_seed(0)
            q, k, v = (torch.randn(args.batch, n, C, generator=g).to(args.device, dtype) for n in (L, Lk, Lk))
            ref = attention(q.double(), k.double(), v.double(), 8, "sdpa")
            impls = ("sdpa", "tiled", "fused") + (("native",) if native_fits(q, k, v, 8, False) else ())
            times, err = {}, {}
            with torch.inference_mode():
                t0 = time.perf_counter()
                attention(q, k, v, 8, "fused")
                sync(args)
                compile_s = time.perf_counter() - t0
                for _ in range(args.reps + 1):  # interleaved; the first round is a warm-up
                    for impl in impls:
                        sync(args)
                        t0 = time.perf_counter()
                        o = attention(q, k, v, 8, impl)
                        sync(args)
                        times.setdefault(impl, []).append(time.perf_counter() - t0)
                        err[impl] = ((o.double() - ref).abs().max() / ref.abs().max()).item()
            med = {impl: statistics.median(ts[1:]) * 1e3 for impl, ts in times.items()}
            rows.append(dict(tokens=L, keys=Lk, channels=C, ms=med, max_rel_err=err, compile_s=compile_s))
            others = ", ".join(f"{impl} {med[impl]:7.2f} ms ({med[impl] / med['sdpa']:.2f}x)" for impl in impls[1:])
            print(f"  {L:4d} x {Lk:4d} tokens, d={C // 8:3d}: sdpa {med['sdpa']:7.2f} ms, {others}; errors "
                  f"{' / '.join(f'{err[i]:.0e}' for i in impls)}; compile {compile_s:.0f} s")
    return rows


def save_random_pipeline(preset, folder):
    """A full-size pipeline (U-Net `preset`, SD v1 VAE and CLIP) with seeded random weights, as a diffusers folder."""
    import dataclasses
    import convert_weights as cw
    from sampler import random_pipeline
    pipe = dataclasses.replace(random_pipeline(preset), scheduler_config=dict(cw.SD_V1_SCHEDULER))
    cw.to_diffusers(pipe, folder)
    return pipe


def load_once(which, folder, dtype):
    """One load in this (fresh) process; prints seconds and peak RSS in GB (its library's import included). The
    library is imported before the clock starts: the load is timed, not `import diffusers` (2.8 s here)."""
    if which == "minisd":
        import convert_weights as cw
    elif which == "diffusers":
        from diffusers import StableDiffusionPipeline
    t0 = time.perf_counter()
    if which == "read":  # the floor: every byte of the weights files read once
        for f in sorted(Path(folder).glob("*/*.safetensors")):
            with open(f, "rb") as fh:
                while fh.read(1 << 24):
                    pass
    elif which == "minisd":
        pipe = cw.load_pipeline(folder, dtype=DTYPES[dtype])
        sum(p.float().sum().item() for p in pipe.unet.parameters())  # touch every page: mmap defers the reads
    else:
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
        size = sum(f.stat().st_size for f in Path(folder).glob("*/*.safetensors")) / 2**30  # GB as peak_gb's
        runs = {"read": [], "minisd": [], "diffusers": []}
        for _ in range(args.reps):
            for which in runs:
                cmd = [sys.executable, __file__, "--load-once", which, folder, f"--dtype={args.dtype}",
                       f"--threads={args.threads}"]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.split()
                runs[which].append((float(out[-2]), float(out[-1])))
    print(f"load a {args.preset} pipeline (U-Net + VAE + CLIP) from a diffusers folder, {size:.2f} GB of fp32 "
          f"safetensors, into {args.dtype}, CPU, {args.threads} threads, warm page cache, median of {args.reps}, each "
          f"in a fresh process")
    med = {k: (statistics.median(s for s, _ in v), max(m for _, m in v)) for k, v in runs.items()}
    for k, (s, m) in med.items():
        print(f"  {k:10s} {s:7.2f} s   peak RSS {m:5.2f} GB   (runs: {', '.join(f'{s:.2f}' for s, _ in runs[k])})")
    print(f"  speed-up of minisd over diffusers: {med['diffusers'][0] / med['minisd'][0]:.2f}x; minisd / reading "
          f"the files: {med['minisd'][0] / med['read'][0]:.2f}x; peak RSS minisd / weights in {args.dtype}: "
          f"{med['minisd'][1] / (size * (1 if args.dtype == 'float32' else 0.5)):.2f}")


def whole_child(which, folder, args):
    """One user's image in this fresh process (the parent times it, imports and loading included); prints the peak
    RSS in GB. minisd: sampler.py's command line with its defaults (bf16 on a CPU that has it). diffusers: its
    pipeline with its defaults (fp32), or tuned as its documentation advises (bf16, U-Net and VAE channels-last;
    fp32 channels-last on a CPU without bf16 arithmetic, where bf16 took 7.5x fp32's step: BENCHMARKS.md)."""
    prompt, out = "a photograph of an astronaut riding a horse", str(Path(folder) / f"{which}.png")
    try:
        if which == "minisd":
            import runpy
            sys.argv = ["sampler.py", prompt, "--weights", folder, "--seed", "0", "--steps", str(args.steps),
                        "--height", str(args.size), "--width", str(args.size), "--out", out,
                        "--device", "cpu"]  # where diffusers' pipeline runs here: the CPU user's image
            runpy.run_path(str(Path(__file__).parent / "sampler.py"), run_name="__main__")
        else:
            from diffusers import StableDiffusionPipeline
            tuned = which == "diffusers-tuned"
            half = tuned and native_bf16()
            pipe = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=torch.bfloat16 if half else None,
                                                           local_files_only=True)
            if tuned:
                pipe.unet.to(memory_format=torch.channels_last)
                pipe.vae.to(memory_format=torch.channels_last)
            pipe.set_progress_bar_config(disable=True)
            pipe(prompt, num_inference_steps=args.steps, height=args.size, width=args.size,
                 generator=torch.Generator().manual_seed(0)).images[0].save(out)
    finally:
        print(peak_gb())


def bench_whole(args):
    """The user's whole image (issue 12, goal 1): whole processes, one after the other, alternating, on one random
    pipeline folder; wall seconds (imports and loading included) and peak RSS."""
    runs = {k: [] for k in ("minisd", "diffusers", "diffusers-tuned")}
    with tempfile.TemporaryDirectory() as folder:
        save_random_pipeline(args.preset, folder)
        for _ in range(args.reps):
            for which in runs:
                t0 = time.perf_counter()
                r = subprocess.run([sys.executable, __file__, "--whole-child", which, folder, f"--size={args.size}",
                                    f"--steps={args.steps}", f"--threads={args.threads}"],
                                   capture_output=True, text=True, check=True)
                runs[which].append((time.perf_counter() - t0, float(r.stdout.split()[-1])))
    tuned = "bf16" if native_bf16() else "fp32 (no bf16 arithmetic here)"
    print(f"whole image, {args.preset}, {args.size}x{args.size}, {args.steps} PNDM steps, each library's defaults "
          f"(and diffusers tuned: {tuned}, channels-last), {args.threads} threads, {args.reps} rounds")
    for k, v in runs.items():
        print(f"  {k:16s} " + ", ".join(f"{s:.1f} s ({gb:.2f} GB)" for s, gb in v))
    med = {k: statistics.median(s for s, _ in v) for k, v in runs.items()}
    print(f"  minisd / diffusers: {med['minisd'] / med['diffusers']:.3f}; minisd / diffusers tuned: "
          f"{med['minisd'] / med['diffusers-tuned']:.3f}")
    return dict(runs={k: [dict(seconds=s, peak_rss_gb=gb) for s, gb in v] for k, v in runs.items()}, median=med,
                ratio=med["minisd"] / med["diffusers"], ratio_tuned=med["minisd"] / med["diffusers-tuned"], tuned=tuned)


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
    # on a GPU, ours also without its CUDA graph: then the same kernels as diffusers, launched eagerly
    times = {k: [] for k in ("minisd", "minisd eager", "diffusers") if args.device == "cuda" or k != "minisd eager"}
    stages, images = [], {}
    for _ in range(args.reps + 1):  # the first round warms up and is not counted
        for name in times:
            sync(args)
            t0 = time.perf_counter()
            if name == "diffusers":
                img = ref(prompt, num_inference_steps=args.steps, height=args.size, width=args.size,
                          latents=latents.to(args.device, DTYPES[args.dtype]), output_type="np").images
                images[name] = torch.from_numpy(img * 255).round()
            else:
                r = txt2img(ours, prompt, steps=args.steps, height=args.size, width=args.size, latents=latents,
                            progress=False, cuda_graph=name == "minisd")
                images[name] = r.images.float()
                if name == "minisd":
                    stages.append(r.times)
            sync(args)
            times[name].append(time.perf_counter() - t0)
    diffs = {k: (images[k] - images["diffusers"]).abs().max().item() for k in times if k != "diffusers"}
    med = {k: statistics.median(v[1:]) for k, v in times.items()}
    print(f"txt2img, {args.preset}, {args.size}x{args.size}, {args.steps} PNDM steps, guidance 7.5 (the pair in "
          f"one U-Net call), {args.dtype}, {args.device}, {torch.get_num_threads()} threads, median of {args.reps} "
          f"(max pixel difference from diffusers: {', '.join(f'{k} {v:.0f}/255' for k, v in diffs.items())})")
    for k, v in times.items():
        print(f"  {k:12s} {med[k]:8.3f} s   (runs: {', '.join(f'{s:.3f}' for s in v[1:])})")
    print("  minisd stages: " + ", ".join(f"{k} {statistics.median(s[k] for s in stages[1:]):.2f} s"
                                          for k in stages[-1]))
    print(f"  speed-up of minisd over diffusers: {med['diffusers'] / med['minisd']:.3f}x")
    return dict(seconds={k: v[1:] for k, v in times.items()}, median=med, ratio=med["minisd"] / med["diffusers"],
                max_pixel_diff=diffs, minisd_stages=stages[1:])


# -----------------------------------------------------------------------------
# distill.py: one whole KD training step (teacher forward + student forward and backward + clipping + AdamW), ours
# against the same step on diffusers U-Nets with forward hooks by name, as BK-SDM's kd_train_text_to_image.py does
# it. Each library in its own process (peak memory is its own); the processes alternate.


def build_kd(args, which):
    """Teacher (args.teacher) and student (args.arch) with seeded random weights; for diffusers, its twins holding
    the same tensors. The teacher is frozen in args.teacher_dtype, the student in fp32."""
    import distill
    torch.manual_seed(0)
    with torch.device(args.device):
        teacher = UNet(PRESETS[args.teacher])
    student = distill.build_student(teacher, args.arch)
    if which == "diffusers":
        from diffusers import UNet2DConditionModel
        twins = []
        for m in (teacher, student):
            with torch.device("meta"):
                ref = UNet2DConditionModel(**{k: v for k, v in m.cfg.to_diffusers().items() if k[0] != "_"})
            ref.load_state_dict(m.state_dict(), strict=True, assign=True)
            twins.append(ref)
        teacher, student = twins
    teacher.to(dtype=DTYPES[args.teacher_dtype]).eval().requires_grad_(False)
    student.train()
    if args.ckpt and which == "diffusers":
        student.enable_gradient_checkpointing()
    elif args.ckpt:
        student.gradient_checkpointing = True
    return teacher, student


def official_kd_step(teacher, student, mapping, acts, x_t, t, ctx, target, opt, amp):
    """The official loop body: student first, then the teacher (outside no_grad, as there), hooks by name."""
    with amp:
        eps_s = student(x_t, t, ctx).sample
        loss_sd = F.mse_loss(eps_s.float(), target.float())
        eps_t = teacher(x_t.to(teacher.dtype), t, ctx.to(teacher.dtype)).sample
        loss_out = F.mse_loss(eps_s.float(), eps_t.float())
        feats = []
        for m_t, m_s in mapping:
            a_t, a_s = (a[0] if isinstance(a, tuple) else a for a in (acts["T", m_t], acts["S", m_s]))
            feats.append(F.mse_loss(a_s.float(), a_t.detach().float()))
        loss = loss_sd + loss_out + sum(feats)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
    opt.step()
    opt.zero_grad()
    return loss.item()


def one_kd_step(args, which):
    """Build one library's models, run args.reps timed steps after a warm-up; print a JSON line."""
    import distill
    t0 = time.perf_counter()
    teacher, student = build_kd(args, which)
    build_s = time.perf_counter() - t0
    g = torch.Generator().manual_seed(1)
    width = PRESETS[args.teacher].cross_attention_dim
    latent = (args.batch, 4, args.latent, args.latent)
    shapes = (latent, (args.batch, 77, width), latent)
    x_t, ctx, target = (torch.randn(*s, generator=g).to(args.device) for s in shapes)
    t = torch.randint(0, 1000, (args.batch,), generator=g).to(args.device)
    opt = torch.optim.AdamW(student.parameters(), lr=5e-5, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    dtype = DTYPES[args.dtype]
    amp = torch.autocast(args.device, dtype) if dtype != torch.float32 else nullcontext()
    mapping = distill.feature_taps(PRESETS[args.teacher], distill.student_config(PRESETS[args.teacher], args.arch))
    if which == "diffusers":  # the official add_hook: register on every module whose name is listed
        acts = {}
        for side, net, names in (("T", teacher, [a for a, _ in mapping]), ("S", student, [b for _, b in mapping])):
            for n, m in net.named_modules():
                if n in names:
                    m.register_forward_hook(lambda mod, i, o, key=(side, n): acts.__setitem__(key, o))

        def step():
            return official_kd_step(teacher, student, mapping, acts, x_t, t, ctx, target, opt, amp)
    else:
        scaler = torch.amp.GradScaler(args.device, enabled=dtype == torch.float16)

        def step():
            return distill.kd_step(student, teacher, mapping, lambda i: (x_t, t, ctx, target), 1, opt, scaler,
                                   amp)["total"]
    loss0 = step()  # warm-up; its loss is compared across libraries (same weights, same inputs)
    times = []
    for _ in range(args.reps):
        sync(args)
        t1 = time.perf_counter()
        step()
        sync(args)
        times.append(time.perf_counter() - t1)
    peak = torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else peak_gb()
    print(json.dumps(dict(which=which, loss0=loss0, times=times, build_s=build_s, peak_gb=peak)))


def bench_distill(args):
    """Alternate the two libraries in fresh processes, args.rounds times each; print medians and ratios."""
    flags = [f"--arch={args.arch}", f"--teacher={args.teacher}", f"--latent={args.latent}", f"--batch={args.batch}",
             f"--device={args.device}", f"--dtype={args.dtype}", f"--teacher-dtype={args.teacher_dtype}",
             f"--reps={args.reps}", f"--threads={args.threads}"] + (["--ckpt"] if args.ckpt else [])
    runs = {"minisd": [], "diffusers": []}
    for _ in range(args.rounds):
        for which in runs:
            out = subprocess.run([sys.executable, __file__, *flags, f"--kd-child={which}"], capture_output=True,
                                 text=True)
            if out.returncode:  # e.g. out of memory, or no diffusers on that machine: report, go on
                print(f"{which} failed:\n{out.stderr[-1500:]}")
                continue
            runs[which].append(json.loads(out.stdout.strip().splitlines()[-1]))
    runs = {w: rs for w, rs in runs.items() if rs}
    med = {w: statistics.median(t for r in rs for t in r["times"]) for w, rs in runs.items()}
    peak = {w: max(r["peak_gb"] for r in rs) for w, rs in runs.items()}
    print(f"KD step, {args.arch} from {args.teacher}, {args.latent}x{args.latent} latent, batch {args.batch}, "
          f"{args.device} {args.dtype} (teacher {args.teacher_dtype}), gradient checkpointing "
          f"{'on' if args.ckpt else 'off'}, {args.threads} threads")
    for w, rs in runs.items():
        print(f"  {w:9s}: {med[w]:.3f} s/step (all: {', '.join(f'{t:.2f}' for r in rs for t in r['times'])}), "
              f"peak {peak[w]:.2f} GB, first loss {rs[0]['loss0']:.6f}")
    if len(runs) == 2:
        print(f"  diffusers / minisd: time x{med['diffusers'] / med['minisd']:.2f}, "
              f"peak memory x{peak['diffusers'] / peak['minisd']:.2f}")

# -----------------------------------------------------------------------------
# fid.py: Inception features per second, batched (ours) against the same network fed image by image (as pytorch-fid
# runs it); the Frechet distance's sqrtm at 2048-d; scoring N 256x256 JPEGs as `coco` does (FID + IS + CLIP score);
# and generating N BK-SDM-Tiny images (random weights: the cost of real ones) as `python fid.py coco` does.


def timed(args, fn):
    sync(args)
    t0 = time.perf_counter()
    out = fn()
    sync(args)
    return time.perf_counter() - t0, out


def bench_fid(args):
    import fid
    import sampler
    dev = args.device
    torch.manual_seed(0)
    model = fid.InceptionV3().to(dev)
    images = torch.randint(0, 256, (args.n, 3, 256, 256), dtype=torch.uint8)
    res = {}
    with torch.no_grad():
        model(images[:args.fid_batch])  # warm-up at both shapes: oneDNN builds its primitives per input shape on first
        model(images[:1])  # use (measured: tens of seconds on a busy 2-core CPU), cuDNN picks its kernels
        for mode in ("fid", "isc"):
            t, _ = timed(args, lambda: [model(images[i:i + args.fid_batch], mode)
                                        for i in range(0, args.n, args.fid_batch)])
            res[f"batched {mode}"] = args.n / t
        k = min(args.n, args.single)
        t, _ = timed(args, lambda: [model(images[i:i + 1]) for i in range(k)])
        res["image by image fid"] = k / t
    for name, v in res.items():
        print(f"inception {name:>20}: {v:8.1f} img/s  (batch {args.fid_batch if 'batched' in name else 1}, {dev})")
    a = np.random.default_rng(0).standard_normal((3000, 2048))
    mu, sigma = a.mean(0), np.cov(a, rowvar=False)
    t, _ = timed(args, lambda: fid.frechet_distance(mu, sigma, mu + 0.1, sigma * 1.1))
    print(f"frechet_distance 2048-d (scipy sqrtm, CPU): {t:.1f} s")
    if args.score:
        from PIL import Image
        with tempfile.TemporaryDirectory() as d:
            rng, files = np.random.default_rng(0), []
            for i in range(args.score):
                files.append(Path(d) / f"{i:05d}.jpg")
                Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(files[-1], quality=75)
            kw = dict(batch_size=args.fid_batch, num_workers=args.workers, progress=False)
            t_fid, st = timed(args, lambda: fid.compute_stats(files, fid.inception_extractor(model), **kw))
            t_isc, _ = timed(args, lambda: fid.features(files, fid.inception_extractor(model, "isc"), **kw))
            t_fd, _ = timed(args, lambda: fid.frechet_distance(*st, *st))
            with torch.device(dev):  # random ViT-g-14 built on the device: its init takes minutes on a CPU
                clip = fid.CLIPModel(fid.CLIP_PRESETS[args.clip]).to(dtype=torch.float16 if dev != "cpu" else
                                                                      torch.float32).eval()
            vocab = fid.clip_text.find_openai_vocab()
            tok = fid.clip_text.Tokenizer(vocab) if vocab else sampler.toy_tokenizer()
            t_clip, _ = timed(args, lambda: fid.clip_score(clip, files, ["a photo of a cat"] * len(files), tok))
        total = t_fid + t_isc + t_fd + t_clip
        print(f"score {args.score} JPEGs 256px on {dev}: FID features {t_fid:.1f} s, IS features {t_isc:.1f} s, "
              f"sqrtm {t_fd:.1f} s, CLIP {args.clip} {t_clip:.1f} s; total {total:.1f} s "
              f"(-> 30K: {((total - t_fd) * 30000 / args.score + t_fd) / 60:.1f} min; the sqrtm once)")
    if args.gen:
        t_build, pipe = timed(args, lambda: sampler.random_pipeline("bk-tiny"))
        dtype = torch.float16 if dev != "cpu" else torch.float32
        pipe.to(dev, dtype)
        prompts = [(f"{i:05d}.jpg", f"a photo of object number {i}") for i in range(args.gen + 1)]
        s = dict(prompts="bench", weights="RANDOM bk-tiny", seed=1234, batch=1, steps=25, guidance=7.5, size=512,
                 world=1)
        with tempfile.TemporaryDirectory() as d:
            for run in ("warm-up", "timed"):
                for sub in ("im512", "im256"):
                    (Path(d) / run / sub).mkdir(parents=True)
            fid.generate(pipe, prompts[:1], Path(d) / "warm-up", s, dev, dtype)  # one image: cuDNN, allocator
            t, _ = timed(args, lambda: fid.generate(pipe, prompts[1:], Path(d) / "timed", s, dev, dtype))
        per = t / args.gen
        print(f"generate BK-SDM-Tiny 512px, PNDM 25 steps, guidance 7.5, batch 1, {dtype}, {dev}: {per:.2f} s/image "
              f"incl. JPEG + resize ({args.gen} images; -> 1,000: {per * 1000 / 60:.1f} min, 30K: "
              f"{per * 30000 / 3600:.1f} h); pipeline build {t_build:.0f} s")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--preset", default="sd-v1", choices=list(PRESETS))
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--latent", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (the CI machine has 2 cores)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--compile", help="U-Net step: torch.compile both models with this mode (e.g. default, "
                                      "max-autotune, reduce-overhead)")
    ap.add_argument("--cuda-graph", action="store_true", help="U-Net step: replay both models as CUDA graphs")
    ap.add_argument("--guided", action="store_true", help="U-Net step: batch/2 latents with two texts each, as "
                    "classifier-free guidance calls it (diffusers' pipeline repeats the latent)")
    ap.add_argument("--attention", action="store_true", help="our attention kernels vs SDPA at SD v1's shapes")
    ap.add_argument("--json", help="also write the measurements to this JSON file")
    ap.add_argument("--fidelity", type=int, default=0, help="U-Net step: --dtype against fp32 over this many inputs")
    ap.add_argument("--qkv", action="store_true", help="benchmark fused vs separate q/k/v projections")
    ap.add_argument("--load", action="store_true", help="benchmark loading a saved pipeline")
    ap.add_argument("--txt2img", action="store_true", help="benchmark a whole text-to-image run")
    ap.add_argument("--whole", action="store_true", help="the user's whole image: whole processes, each library's "
                                                         "defaults (and diffusers tuned)")
    ap.add_argument("--whole-child", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--size", type=int, default=256, help="--txt2img: image side in pixels")
    ap.add_argument("--steps", type=int, default=10, help="--txt2img: sampling steps")
    ap.add_argument("--distill", action="store_true", help="benchmark one KD training step (see distill.py)")
    ap.add_argument("--arch", default="base", choices=["base", "small", "tiny"], help="--distill: the student")
    ap.add_argument("--teacher", default="sd-v1", choices=list(PRESETS), help="--distill: the teacher preset")
    ap.add_argument("--teacher-dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--ckpt", action="store_true", help="--distill: gradient checkpointing in the student")
    ap.add_argument("--rounds", type=int, default=2, help="--distill: processes per library, alternating")
    ap.add_argument("--fid", action="store_true", help="benchmark the Inception network and the COCO scoring")
    ap.add_argument("--n", type=int, default=64, help="--fid: images for the Inception throughput")
    ap.add_argument("--single", type=int, default=16, help="--fid: images for the image-by-image figure")
    ap.add_argument("--fid-batch", type=int, default=50, help="--fid: pytorch-fid's default batch")
    ap.add_argument("--score", type=int, default=0, help="--fid: score this many 256px JPEGs (FID + IS + CLIP)")
    ap.add_argument("--clip", default="vit-g-14", help="--fid: CLIP preset for --score (random weights)")
    ap.add_argument("--workers", type=int, default=0, help="--fid: image-reading workers")
    ap.add_argument("--gen", type=int, default=0, help="--fid: generate this many BK-SDM-Tiny images (random weights)")
    ap.add_argument("--kd-child", choices=["minisd", "diffusers"], help=argparse.SUPPRESS)
    ap.add_argument("--peak-rss", help=argparse.SUPPRESS)
    ap.add_argument("--load-once", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.guided and (args.batch < 2 or args.batch % 2):
        ap.error(f"--guided: one latent with its two texts, so an even --batch, got {args.batch}")
    given = [n for n in ("distill", "fid", "load", "whole", "fidelity", "txt2img", "qkv", "attention")
             if getattr(args, n)]
    if len(given) > 1:
        ap.error(f"one mode at a time, got {', '.join('--' + n for n in given)}")
    if args.fidelity < 0 or args.fidelity and args.dtype == "float32":
        ap.error("--fidelity N: N >= 1 inputs, with --dtype bfloat16 or float16 (measured against float32)")
    torch.set_num_threads(args.threads)
    modes = [("kd_child", lambda a: one_kd_step(a, a.kd_child)), ("distill", bench_distill), ("fid", bench_fid),
             ("peak_rss", peak_rss), ("load_once", lambda a: load_once(*a.load_once, a.dtype)),
             ("load", bench_load), ("whole_child", lambda a: whole_child(*a.whole_child, a)),
             ("whole", bench_whole), ("fidelity", bench_fidelity), ("txt2img", bench_txt2img), ("qkv", bench_qkv),
             ("attention", bench_attention)]
    name, run = next(((n, f) for n, f in modes if getattr(args, n)), ("unet", bench_unet))  # the mode given
    result = run(args)
    if args.json:  # the measurements with what produced them
        machine = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
        versions = {}  # diffusers' loads differ with accelerate installed (BENCHMARKS has rows with and without)
        for package in ("diffusers", "transformers", "accelerate"):
            try:
                versions[package] = importlib.metadata.version(package)
            except importlib.metadata.PackageNotFoundError:
                versions[package] = None
        Path(args.json).write_text(json.dumps(dict(mode=name, args=vars(args), machine=machine, torch=torch.__version__,
                                                   versions=versions, result=result), indent=1, default=str))
