"""vlonghorn against DeiT of the same size, end to end, in one process on one GPU.

    python benchmarks/bench_model.py [--out DIR] [--res 224 1024 2048] [--batch 256 16 2] [--compile [MODE]]
                                     [--sizes small tiny] [--kwargs JSON] [--tag TAG]

For each resolution: inference (model.eval(), torch.inference_mode(), bf16 autocast) and a training step
(bf16 autocast, forward + backward + fused AdamW step), images/s from the median of CUDA-event-timed repeats
after warm-up, peak memory (torch.cuda.max_memory_allocated), and the ratios vlonghorn / deit. Both models are
created at the resolution (img_size=...), the same batch for both, random inputs. For each of --sizes (small:
vlonghorn_small and deit_small_patch16_224; tiny: vlonghorn_tiny and deit_tiny_patch16_224), vlonghorn runs as
created by default (selective recompute of each block's non-scan ops in training) and, for small, also with
recompute_mixer=False (every activation saved); --kwargs (JSON) go to every vlonghorn model's create_model.
--compile wraps every model in torch.compile (default mode, or MODE, e.g. reduce-overhead for CUDA graphs; the
file tag gets compiled[_MODE]). A resolution given twice (at two batch sizes) is kept as two entries. Writes
model_<device>_<date>[_<tag>].{json,md} into --out (default benchmarks/results); the json after every
measurement, so partial results survive a timeout.
"""
import argparse
import json

import timm
import torch

import vlonghorn  # noqa: F401  (registers the models with timm)
from harness import RESULTS, env_line, environment, gpu_time, md_table, training_step, write_result

# per size, label: (timm name, create_model kwargs); the last is the peer
SIZES = {
    "small": {
        "vlonghorn_small": ("vlonghorn_small", {}),
        "vlonghorn_small (recompute_mixer=False)": ("vlonghorn_small", {"recompute_mixer": False}),
        "deit_small_patch16_224": ("deit_small_patch16_224", {}),
    },
    "tiny": {
        "vlonghorn_tiny": ("vlonghorn_tiny", {}),
        "deit_tiny_patch16_224": ("deit_tiny_patch16_224", {}),
    },
}


def _models(sizes):
    """label: (timm name, kwargs, peer label) for the sizes of a run."""
    out = {}
    for size in sizes:
        labels = list(SIZES[size])
        for label in labels:
            out[label] = (*SIZES[size][label], labels[-1])
    return out


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

    out["infer_img_s"] = batch / gpu_time(infer, reps, warmup=3)
    out["infer_peak_GiB"] = torch.cuda.max_memory_allocated() / 2 ** 30
    if train:
        model.train()
        target = torch.randint(0, 1000, (batch,), device="cuda")
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        step = training_step(run, model.parameters(), x, target)

        try:
            out["train_img_s"] = batch / gpu_time(step, reps, warmup=2)
            out["train_peak_GiB"] = torch.cuda.max_memory_allocated() / 2 ** 30
        except torch.OutOfMemoryError:
            out["train_img_s"] = None
            out["train_peak_GiB"] = "OOM"
    return out


def _ratio(a, b):
    return f"{a / b:.2f}" if isinstance(a, float) and isinstance(b, float) and b else ""


def report(meta, results):
    """The markdown tables of a run (meta and results as written to the json)."""
    models = _models(meta.get("sizes", ["small"]))
    kwargs = meta.get("vlonghorn_kwargs") or {}
    lines = ["# End to end: vlonghorn vs DeiT of the same size", "",
             f"{env_line(meta)}; bf16 autocast; inference under inference_mode; training step with fused AdamW"
             + (f"; every model under torch.compile (mode {meta['compile']})" if meta["compile"] else "")
             + (f"; vlonghorn models created with {json.dumps(kwargs)}" if kwargs else "") + ".", ""]
    rows = []
    for r in results.values():
        for name in models:
            if name not in r:
                continue
            m = r[name]
            tp = m.get("train_peak_GiB")
            rows.append([r["res"], r["batch"], name, f"{m['infer_img_s']:.1f}", f"{m['infer_peak_GiB']:.2f}",
                         "" if m.get("train_img_s") is None else f"{m['train_img_s']:.1f}",
                         tp if isinstance(tp, str) else f"{tp:.2f}"])
    lines += md_table(["res", "batch", "model", "infer img/s", "infer peak GiB", "train img/s", "train peak GiB"],
                      rows)
    rows = [[r["res"], r["batch"], label, _ratio(r[label]["infer_img_s"], r[peer]["infer_img_s"]),
             _ratio(r[label].get("train_img_s"), r[peer].get("train_img_s")),
             _ratio(r[label].get("train_peak_GiB"), r[peer].get("train_peak_GiB"))]
            for r in results.values() for label, (_, _, peer) in models.items()
            if label != peer and label in r and peer in r]
    lines += [""] + md_table(["res", "batch", "model", "inference ratio (vlonghorn / deit)", "training ratio",
                              "training peak memory ratio"], rows)
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--res", type=int, nargs="+", default=[224, 1024, 2048])
    ap.add_argument("--batch", type=int, nargs="+", default=[256, 16, 2])
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--compile", nargs="?", const="default", default=None, metavar="MODE",
                    help="torch.compile every model (warm-up includes compiling), in its default mode or MODE")
    ap.add_argument("--sizes", nargs="+", default=["small"], choices=list(SIZES))
    ap.add_argument("--kwargs", default="{}", help="JSON keyword arguments for every vlonghorn model")
    ap.add_argument("--tag", default="", help="suffix for the result files (after compiled[_MODE])")
    opt = ap.parse_args()
    vkwargs = json.loads(opt.kwargs)
    if not isinstance(vkwargs, dict):
        ap.error(f"--kwargs must be a JSON object, got {opt.kwargs!r}")
    meta = environment(autocast="bfloat16", optimizer="AdamW(fused=True)", compile=opt.compile or False,
                       sizes=opt.sizes, vlonghorn_kwargs=vkwargs)
    tag = "_".join(t for t in ("compiled" if opt.compile else "",
                               opt.compile if opt.compile not in (None, "default") else "", opt.tag) if t)
    results = {}
    for res, batch in zip(opt.res, opt.batch):
        key = res if opt.res.count(res) == 1 else f"{res}_b{batch}"    # one resolution at several batch sizes
        results[key] = {"res": res, "batch": batch}
        for label, (name, kwargs, _) in _models(opt.sizes).items():
            if name.startswith("vlonghorn"):
                kwargs = {**kwargs, **vkwargs}
            r = bench_one(name, res, batch, opt.reps if res <= 1024 else max(2, opt.reps // 3), compile=opt.compile,
                          **kwargs)
            torch.cuda.empty_cache()       # the model and its optimizer are gone with bench_one's frame
            results[key][label] = r
            print(res, batch, label, json.dumps(r), flush=True)
            write_result("model", meta, {"results": results}, tag=tag, out=opt.out)
    md = report(meta, results)
    stem = write_result("model", meta, {"results": results}, md, tag, opt.out)
    print(md + f"\nwritten: {stem}.{{json,md}}")


if __name__ == "__main__":
    main()
