"""Deployment on the CPU: ONNX export time, graph size and onnxruntime latency, next to timm's DeiT of the same size.

    python benchmarks/bench_export.py [--models vlonghorn_small vlonghorn_tiny] [--res 224] [--batch 1]
                                      [--repeats 10] [--tag TAG]

For each model and its DeiT peer, in one process: `torch.onnx.export(model, (x,), dynamo=True)` with its default
optimizer (wall time, node count of the main graph), onnxruntime's CPU latency (median of --repeats after a warm-up)
and its largest difference from PyTorch's output, next to PyTorch's eager latency on the same input. With
--scaling, the node count of vlonghorn_nano at growing token counts (how the graph grows with the sequence). Writes
export_<cpu>_<date>[_<tag>].{json,md} into --out (default benchmarks/results).
"""
import argparse
import time

import onnxruntime as ort
import timm
import torch

import vlonghorn  # noqa: F401  (registers the models with timm)
from harness import RESULTS, cpu_time, environment, md_table, write_result

PEERS = {"vlonghorn_tiny": "deit_tiny_patch16_224", "vlonghorn_small": "deit_small_patch16_224",
         "vlonghorn_base": "deit_base_patch16_224"}


def export(name, res, batch, repeats):
    torch.manual_seed(0)
    model = timm.create_model(name, img_size=res).eval()
    x = torch.randn(batch, 3, res, res)
    start = time.perf_counter()
    program = torch.onnx.export(model, (x,), dynamo=True, verbose=False)
    seconds = time.perf_counter() - start
    proto = program.model_proto
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: x.numpy()}
    with torch.inference_mode():
        ref = model(x)
        eager, _ = cpu_time(lambda: model(x), repeats)
    out = torch.from_numpy(session.run(None, feed)[0])
    onnx_time, _ = cpu_time(lambda: session.run(None, feed), repeats)
    return {"export_s": seconds, "nodes": len(proto.graph.node), "ort_ms": 1e3 * onnx_time,
            "eager_ms": 1e3 * eager, "max_abs_diff": (out - ref).abs().max().item()}


def node_counts(sizes):
    """Main-graph nodes of vlonghorn_nano (patch 8) exported at each image size: {tokens: nodes}."""
    counts = {}
    for res in sizes:
        model = timm.create_model("vlonghorn_nano", img_size=res).eval()
        program = torch.onnx.export(model, (torch.randn(1, 3, res, res),), dynamo=True, verbose=False)
        counts[(res // 8) ** 2 + 1] = len(program.model_proto.graph.node)
    return counts


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["vlonghorn_small", "vlonghorn_tiny"], choices=sorted(PEERS))
    ap.add_argument("--res", type=int, default=224)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--scaling", nargs="*", type=int, default=None, metavar="PX",
                    help="also count vlonghorn_nano's nodes at these image sizes (default with the flag: "
                         "64 128 256 512 1024)")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    results, rows = {}, []
    for name in args.models:
        for model in (name, PEERS[name]):
            r = results[model] = export(model, args.res, args.batch, args.repeats)
            print(model, {k: round(v, 6) for k, v in r.items()}, flush=True)
            rows.append([model, f"{r['export_s']:.1f}", r["nodes"], f"{r['ort_ms']:.0f}", f"{r['eager_ms']:.0f}",
                         f"{r['max_abs_diff']:.1e}"])
    meta = environment(device="cpu", threads=torch.get_num_threads(), res=args.res, batch=args.batch)
    lines = [f"# ONNX export and onnxruntime on the CPU, {args.res} px, batch {args.batch}", "",
             f"{meta['device']} ({meta['cores']} cores, {meta['threads']} torch threads); torch {meta['torch']}, "
             f"onnxruntime {ort.__version__}; {meta['date'][:10]}. "
             "`torch.onnx.export(model, (x,), dynamo=True)` with its default optimizer; latencies are medians.", "",
             *md_table(["model", "export s", "nodes", "onnxruntime ms", "PyTorch eager ms", "max abs diff"], rows)]
    data = {"results": results}
    if args.scaling is not None:
        counts = node_counts(args.scaling or [64, 128, 256, 512, 1024])
        data["nano_nodes_by_tokens"] = counts
        lines += ["", "vlonghorn_nano (patch 8), main-graph nodes by token count: "
                  + ", ".join(f"{t} tokens: {n}" for t, n in counts.items())]
        print(counts)
    stem = write_result("export", meta, data, "\n".join(lines), tag=args.tag, out=args.out)
    print("\n".join(lines))
    print(f"wrote {stem}.json and .md")


if __name__ == "__main__":
    main()
