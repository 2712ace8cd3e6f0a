"""GPU time per kernel of one vlonghorn model forward (inference, bf16 autocast), from torch.profiler (GPU only):

    python benchmarks/profile_model.py [--model vlonghorn_small] [--res 1024 2048] [--batch 16 2] [--rows 14]

Prints, per resolution, the kernels sorted by total GPU time over the forward (all layers): where the time of
the end-to-end figures of bench_model.py goes.
"""
import argparse

import timm
import torch
from torch.profiler import ProfilerActivity, profile

import vlonghorn  # noqa: F401  (registers the models with timm)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="vlonghorn_small")
    ap.add_argument("--res", type=int, nargs="+", default=[1024, 2048])
    ap.add_argument("--batch", type=int, nargs="+", default=[16, 2])
    ap.add_argument("--rows", type=int, default=14)
    opt = ap.parse_args()
    for res, batch in zip(opt.res, opt.batch):
        model = timm.create_model(opt.model, img_size=res).cuda().eval()
        x = torch.randn(batch, 3, res, res, device="cuda")
        with torch.inference_mode(), torch.autocast("cuda", torch.bfloat16):
            for _ in range(3):   # compile and warm up
                model(x)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                model(x)
                torch.cuda.synchronize()
        print(f"{opt.model}, {res} px, batch {batch}, {torch.cuda.get_device_name()}")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=opt.rows, max_name_column_width=60))
        del model, x


if __name__ == "__main__":
    main()
