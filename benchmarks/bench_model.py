"""vlonghorn_small against deit_small_patch16_224, end to end, in one process on one GPU.

    python benchmarks/bench_model.py [--out DIR] [--res 224 1024 2048] [--batch 256 16 2] [--compile [MODE]]

For each resolution: inference (model.eval(), torch.inference_mode(), bf16 autocast) and a training step
(bf16 autocast, forward + backward + fused AdamW step), images/s from the median of CUDA-event-timed repeats
after warm-up, peak memory (torch.cuda.max_memory_allocated), and the ratios vlonghorn / deit. Both models are
created at the resolution (img_size=...), the same batch for both, random inputs. vlonghorn_small runs twice:
as created by default (selective recompute of each block's non-scan ops in training) and with
recompute_mixer=False (every activation saved). --compile wraps every model in torch.compile (default mode, or
MODE, e.g. reduce-overhead for CUDA graphs) and writes model_<device>_compiled[_MODE].*. A resolution given twice
(at two batch sizes) is kept as two entries. Writes model_<device>.json and .md into --out (default
benchmarks/results).
"""
import argparse
import datetime
import json
import os

import timm
import torch
import triton

import vlonghorn  # noqa: E402,F401  (registers the models with timm)

# label: (timm name, create_model kwargs); the first is the default vlonghorn, the last the peer
MODELS = {
    "vlonghorn_small": ("vlonghorn_small", {}),
    "vlonghorn_small (recompute_mixer=False)": ("vlonghorn_small", {"recompute_mixer": False}),
    "deit_small_patch16_224": ("deit_small_patch16_224", {}),
}
PEER = "deit_small_patch16_224"


def _time(fn, warmup, reps):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2] * 1e-3  # seconds


def bench_one(name, res, batch, reps, train=True, compile=None, **kwargs):
    torch.manual_seed(0)
    model = timm.create_model(name, img_size=res, num_classes=1000, **kwargs).cuda()
    run = torch.compile(model, mode=None if compile == "default" else compile) if compile else model
    x = torch.randn(batch, 3, res, res, device="cuda")
    out = {}
    model.eval()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()

    def infer():
        with torch.inference_mode(), torch.autocast("cuda", torch.bfloat16):
            run(x)

    t = _time(infer, 3, reps)
    out["infer_img_s"] = batch / t
    out["infer_peak_GiB"] = torch.cuda.max_memory_allocated() / 2 ** 30
    if train:
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        target = torch.randint(0, 1000, (batch,), device="cuda")
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()

        def step():
            with torch.autocast("cuda", torch.bfloat16):
                loss = torch.nn.functional.cross_entropy(run(x), target)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        try:
            t = _time(step, 2, reps)
            out["train_img_s"] = batch / t
            out["train_peak_GiB"] = torch.cuda.max_memory_allocated() / 2 ** 30
        except torch.OutOfMemoryError:
            out["train_img_s"] = None
            out["train_peak_GiB"] = "OOM"
        del opt
    del model, run, x
    torch.cuda.empty_cache()
    return out


def report(meta, results):
    """The markdown tables of a run (meta and results as written to the json)."""
    lines = [f"# End to end: vlonghorn_small vs deit_small ({meta['device']})", "",
             f"torch {meta['torch']}, triton {meta['triton']}, timm {meta['timm']}, {meta['date']}; "
             "bf16 autocast; inference under inference_mode; training step with fused AdamW"
             + (f"; every model under torch.compile (mode {meta['compile']})." if meta["compile"] else "."), "",
             "| res | batch | model | infer img/s | infer peak GiB | train img/s | train peak GiB |", "|" + "---|" * 7]
    for r in results.values():
        for name in MODELS:
            m = r[name]
            tr = "" if m.get("train_img_s") is None else f"{m['train_img_s']:.1f}"
            tp = m.get("train_peak_GiB")
            tp = tp if isinstance(tp, str) else f"{tp:.2f}"
            lines.append(f"| {r['res']} | {r['batch']} | {name} | {m['infer_img_s']:.1f} | {m['infer_peak_GiB']:.2f} | "
                         f"{tr} | {tp} |")
    lines += ["", "| res | batch | model | inference ratio (vlonghorn / deit) | training ratio | training peak memory "
              "ratio |", "|---|---|---|---|---|---|"]
    for r in results.values():
        d = r[PEER]
        for label in MODELS:
            if label == PEER:
                continue
            v = r[label]
            tr = (f"{v['train_img_s'] / d['train_img_s']:.2f}" if v.get("train_img_s") and d.get("train_img_s")
                  else "")
            mr = (f"{v['train_peak_GiB'] / d['train_peak_GiB']:.2f}"
                  if not isinstance(v.get("train_peak_GiB"), str) and not isinstance(d.get("train_peak_GiB"), str)
                  else "")
            lines.append(f"| {r['res']} | {r['batch']} | {label} | {v['infer_img_s'] / d['infer_img_s']:.2f} | {tr} | "
                         f"{mr} |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--res", type=int, nargs="+", default=[224, 1024, 2048])
    ap.add_argument("--batch", type=int, nargs="+", default=[256, 16, 2])
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--compile", nargs="?", const="default", default=None, metavar="MODE",
                    help="torch.compile every model (warm-up includes compiling), in its default mode or MODE")
    opt = ap.parse_args()
    dev = torch.cuda.get_device_name()
    from vlonghorn.kernels import CONFIG
    meta = {"device": dev, "torch": torch.__version__, "triton": triton.__version__, "timm": timm.__version__,
            "kernel_config": dict(CONFIG),
            "date": datetime.datetime.now().isoformat(timespec="seconds"), "autocast": "bfloat16",
            "optimizer": "AdamW(fused=True)", "compile": opt.compile or False}
    results = {}
    os.makedirs(opt.out, exist_ok=True)
    tag = dev.replace(" ", "_").replace("/", "_") + ("_compiled" if opt.compile else "")
    tag += f"_{opt.compile}" if opt.compile not in (None, "default") else ""
    for res, batch in zip(opt.res, opt.batch):
        key = res if opt.res.count(res) == 1 else f"{res}_b{batch}"    # one resolution at several batch sizes
        results[key] = {"res": res, "batch": batch}
        for label, (name, kwargs) in MODELS.items():
            r = bench_one(name, res, batch, opt.reps if res <= 1024 else max(2, opt.reps // 3), compile=opt.compile,
                          **kwargs)
            results[key][label] = r
            print(res, batch, label, json.dumps(r), flush=True)
            with open(os.path.join(opt.out, f"model_{tag}.json"), "w") as fh:  # partial results survive a timeout
                json.dump({"meta": meta, "results": results}, fh, indent=1)
    md = report(meta, results)
    print(md)
    with open(os.path.join(opt.out, f"model_{tag}.json"), "w") as fh:
        json.dump({"meta": meta, "results": results}, fh, indent=1)
    with open(os.path.join(opt.out, f"model_{tag}.md"), "w") as fh:
        fh.write(md)


if __name__ == "__main__":
    main()
