"""Model-level speed of one source tree of vlonghorn next to timm's DeiT, for before/after comparisons of a change.

    python benchmarks/bench_revisions.py --tree DIR --label NAME [--out FILE.jsonl] [--cases train224 ...]

DIR holds a `vlonghorn` package with its kernels at `vlonghorn/kernels` (what `pip install` lays out); the script
imports vlonghorn from there, so two trees (a change and the commit before it) can be timed by alternating runs
in the same session on the same GPU. Measures, in bf16 autocast, inference images/s (eval, inference_mode) at
224 px (batch 256), 1024 px (16) and 2048 px (2), and training images/s at 224 px (batch 256, fused AdamW), for
vlonghorn_small and deit_small_patch16_224, and each step's host time (where it nears the step's duration, the
step waits for Python); appends one JSON line per run to --out.
"""
import argparse
import json
import sys
import time

from harness import gpu_time, host_time, training_step

CASES = [("infer", 224, 256), ("infer", 1024, 16), ("infer", 2048, 2), ("train", 224, 256)]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tree", required=True, help="folder holding the vlonghorn package to import")
    ap.add_argument("--label", required=True)
    ap.add_argument("--out", default=None, help="JSON-lines file to append the result to")
    ap.add_argument("--cases", nargs="+", default=None, choices=[f"{k}{r}" for k, r, _ in CASES],
                    help="run only these cases (default: all)")
    args = ap.parse_args()
    sys.path.insert(0, args.tree)      # the source tree under test (not a script), before any installed vlonghorn
    import timm
    import torch
    import vlonghorn
    assert vlonghorn.__file__.startswith(args.tree), vlonghorn.__file__
    result = {"label": args.label, "device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d"), "cases": {}}
    for kind, res, batch in CASES:
        if args.cases and f"{kind}{res}" not in args.cases:
            continue
        row = {}
        for name in ("vlonghorn_small", "deit_small_patch16_224"):
            torch.manual_seed(0)
            extra = {"dynamic_img_size": True} if name.startswith("deit") else {"img_size": res}
            model = timm.create_model(name, num_classes=1000, **extra).cuda()
            x = torch.randn(batch, 3, res, res, device="cuda")
            if kind == "infer":
                model.eval()

                def step():
                    with torch.inference_mode(), torch.autocast("cuda", torch.bfloat16):
                        model(x)
            else:
                model.train()
                target = torch.randint(0, 1000, (batch,), device="cuda")
                step = training_step(model, model.parameters(), x, target)
            row[name] = batch / gpu_time(step)
            # the host's time per step, each from an idle GPU: next to the step's GPU-timed duration it says whether
            # the step waits for Python
            row[f"{name} host ms"] = 1e3 * host_time(step)
            torch.cuda.empty_cache()
        row["ratio"] = row["vlonghorn_small"] / row["deit_small_patch16_224"]
        result["cases"][f"{kind} {res}px b{batch}"] = row
        print(f"{args.label}: {kind} {res}px b{batch}: vlonghorn_small {row['vlonghorn_small']:.0f} img/s, "
              f"deit_small {row['deit_small_patch16_224']:.0f} img/s, ratio {row['ratio']:.3f}; host ms per step "
              f"{row['vlonghorn_small host ms']:.1f} vs GPU-timed {1e3 * batch / row['vlonghorn_small']:.1f}",
              flush=True)
    if args.out:
        with open(args.out, "a") as fh:
            fh.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
