"""How far bf16 training gradients are from float64, eager against torch.compile, unfused against fused norms (GPU).

    python benchmarks/grad_error.py

The model of the CUDA case of tests/ops/test_recompute.py (vlonghorn_small with 4 blocks, 224 px, patch 8, 5
classes, batch 32, recompute_mixer on): the same weights in float64 (PyTorch path) give the reference; each
variant runs under bf16 autocast, eager or under torch.compile (inductor, fullgraph), with fused_norm off and on.
Prints, per variant, the RMS-relative error of the output and of every parameter's gradient against the reference
(the worst tensor and the median), then, per norm setting, the largest ratio of compiled to eager error over the
tensors: what the test's tolerance rests on.
"""
import copy
import json

import timm
import torch

import vlonghorn  # noqa: F401  (registers the models with timm)


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def main():
    torch.manual_seed(0)
    x = torch.randn(32, 3, 224, 224, device="cuda")
    errors = {}
    for fused in (False, True):
        torch.manual_seed(1)
        base = timm.create_model("vlonghorn_small", img_size=224, patch_size=8, num_classes=5, depth=4,
                                 fused_norm=fused).cuda()
        ref = copy.deepcopy(base).double()
        y = ref(x.double())
        y.square().sum().backward()
        grads = {n: p.grad for n, p in ref.named_parameters()}
        for variant in ("eager", "compiled"):
            model = copy.deepcopy(base)
            run = torch.compile(model, fullgraph=True) if variant == "compiled" else model
            with torch.autocast("cuda", torch.bfloat16):
                out = run(x)
            out.float().square().sum().backward()
            errs = {n: rel(p.grad, grads[n]) for n, p in model.named_parameters()}
            errors[fused, variant] = errs
            worst = max(errs, key=errs.get)
            print(json.dumps({"fused": fused, "variant": variant, "y": rel(out.detach(), y.detach()), "worst": worst,
                              "worst_err": errs[worst], "median_err": sorted(errs.values())[len(errs) // 2]}),
                  flush=True)
    for fused in (False, True):
        eager, compiled = errors[fused, "eager"], errors[fused, "compiled"]
        ratio = {n: compiled[n] / max(eager[n], 1e-12) for n in eager}
        worst = max(ratio, key=ratio.get)
        print("fused", fused, "max compiled/eager error-vs-fp64 ratio", round(ratio[worst], 2), worst, "errs",
              compiled[worst], eager[worst])


if __name__ == "__main__":
    main()
