"""Train the same model twice on the GPU, once on the Triton kernels and once on the PyTorch path, and compare.

    python benchmarks/compare_backends.py --data-dir data/cifar10 [--steps 200] [--out DIR] [--tag TAG]

Both runs use train.py with the same recipe, seed and data order (configs/cifar10.yaml, vlonghorn_tiny, bf16);
only VLONGHORN_BACKEND differs. Prints and writes (backends_<device>_<date>[_<tag>].{json,md}) the logged training
loss of both at every --log-every steps and their largest difference. VLONGHORN_KERNEL_CONFIG in the environment
applies to the Triton run and is recorded with the results (e.g. '{"checkpoint_every": 16, "chunk_len": 16,
"segment_windows": 1}' sends CIFAR's 65-token sequences through the chunked forward and the segmented backward).
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile

from harness import RESULTS, ROOT, environment, md_table, write_result

LINE = re.compile(r"train (\d+) \[(\d+)/(\d+)\] loss ([0-9.]+) .* (\d+) img/s")


def run(backend, args):
    env = dict(os.environ, VLONGHORN_BACKEND=backend, PYTHONUNBUFFERED="1")
    command = [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs/cifar10.yaml"),
               "--data-dir", args.data_dir, "--model", "vlonghorn_tiny", "--epochs", "2", "--seed", "0",
               "--stop-after-steps", str(args.steps), "--log-interval", str(args.log_every), "--no-progress",
               "--output", tempfile.mkdtemp(), "--experiment", backend, "--workers", str(args.workers)]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{backend} run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    # keyed by update number: epoch * updates per epoch + step within the epoch
    return {int(m.group(1)) * int(m.group(3)) + int(m.group(2)): (float(m.group(4)), float(m.group(5)))
            for m in LINE.finditer(proc.stdout + proc.stderr)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--log-every", type=int, default=20)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--tag", default="", help="suffix for the result files")
    args = parser.parse_args()
    runs = {backend: run(backend, args) for backend in ("triton", "torch")}
    steps = sorted(set(runs["triton"]) & set(runs["torch"]))
    rows = [dict(step=s, loss_triton=runs["triton"][s][0], loss_torch=runs["torch"][s][0]) for s in steps]
    diff = max(abs(r["loss_triton"] - r["loss_torch"]) for r in rows)
    meta = environment(model="vlonghorn_tiny", recipe="configs/cifar10.yaml", steps=args.steps,
                       max_abs_loss_diff=diff, img_s_triton=runs["triton"][steps[-1]][1],
                       img_s_torch=runs["torch"][steps[-1]][1],
                       kernel_config_env=os.environ.get("VLONGHORN_KERNEL_CONFIG"))
    lines = [f"# Training loss: Triton kernels vs PyTorch path ({meta['date'][:10]})", "",
             f"{meta['device']}; torch {meta['torch']}, triton {meta['triton']}. vlonghorn_tiny on CIFAR-10 "
             f"(configs/cifar10.yaml, bf16, seed 0, same data order), {args.steps} updates. Largest difference of "
             f"the logged loss: {diff:.4f}. Training img/s (cumulative): Triton {meta['img_s_triton']:.0f}, "
             f"PyTorch {meta['img_s_torch']:.0f}." + (f" Kernel launch overrides (VLONGHORN_KERNEL_CONFIG): "
                                                      f"{meta['kernel_config_env']}." if meta["kernel_config_env"]
                                                      else ""), ""]
    lines += md_table(["step", "loss (Triton)", "loss (PyTorch)"],
                      [[r["step"], f"{r['loss_triton']:.4f}", f"{r['loss_torch']:.4f}"] for r in rows])
    md = "\n".join(lines) + "\n"
    stem = write_result("backends", meta, {"rows": rows}, md, args.tag, args.out)
    print(md + f"\nwritten: {stem}.{{json,md}}")


if __name__ == "__main__":
    main()
