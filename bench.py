"""
bench.py: how fast vae.py trains on this machine, and how close that is to its limit.

    python bench.py --data_dir ./mnist                      # both models, default device
    python bench.py --model conv                            # one model
    python bench.py --model mlp --profile --no_loader       # where the step's time goes
    python bench.py --model conv --res_blocks 0             # any other flag is vae.py's
    python bench.py --whole_run --examples main.py          # a user's MLP command, end to end

For each model it times, after a warm-up, (1) single training steps, (2) whole
epochs of vae.py's own loop (data held on the device as one tensor) with the test
pass, and (3) the same model fed by the conventional pipeline of
torchvision.datasets.MNIST + ToTensor + DataLoader, and prints images per second,
seconds per epoch, peak memory, FLOPs per image and the fraction of the device's
measured matmul rate that the training step reaches. On CUDA every timing waits
for the GPU (torch.cuda.synchronize) before reading the clock.

--whole_run times what a user waits for instead: `python vae.py --model mlp
--latent_dim 20 --epochs 10` from start to exit, split into the epochs (metrics.csv's
seconds: training and test pass) and the fixed cost (the rest: imports, loading,
checkpoints, the final report and figures). With --examples PATH it then times
pytorch/examples' vae/main.py (the same MLP task, 10 epochs) the same way, one run
after the other, and prints the ratio and both test losses.

Results measured with it are in README.md.
"""

import argparse
import csv
import os
import re
import resource
import subprocess
import sys
import tempfile
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

import vae


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_rate(device, dtype, n=2048, reps=10):
    """Measured FLOP/s of an n x n x n matmul in `dtype`: the device's practical ceiling."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def flops_per_image(model, x):
    """FLOPs of one training step's forward and backward pass, divided by the batch size."""
    counter = FlopCounterMode(display=False)
    with counter:
        logits, mu, logvar = model(x)
        vae.vae_loss(logits, x, mu, logvar)[0].backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / len(x)


def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return (
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )  # Linux: KiB; the process's peak


def time_steps(step_model, optimizer, train_x, batch_size, step, device, steps):
    x = vae.to_float(train_x[:batch_size])
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step(step_model, optimizer, x, 1.0)
    sync(device)
    return (time.perf_counter() - t0) / steps


def time_dataloader_epoch(step_model, optimizer, data_dir, batch_size, device, workers):
    """One epoch fed the way most examples do it: a Dataset of PIL images and a DataLoader."""
    from torchvision import datasets, transforms

    ds = datasets.MNIST(data_dir, train=True, download=False, transform=transforms.ToTensor())
    loader = torch.utils.data.DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        pin_memory=device.type == "cuda",
    )
    step_model.train()
    sync(device)
    t0 = time.perf_counter()
    for x, _ in loader:
        x = x.to(device, non_blocking=True)
        vae.train_step(step_model, optimizer, x, 1.0)
    sync(device)
    return time.perf_counter() - t0


def profile_steps(step_model, optimizer, train_x, batch_size, step, device, steps=20, rows=12):
    """Print torch.profiler's table of the operators that take the time in `steps` training steps."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        time_steps(step_model, optimizer, train_x, batch_size, step, device, steps)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=40))


def bench_model(name, args, device, rate):
    """Time one model as vae.py's command line builds it (its layout, its fused Adam, its step)."""
    torch.manual_seed(0)
    flags = ["--model", name, "--latent_dim", str(args.latent_dim), "--data_dir", args.data_dir]
    run_args = vae.parse_args(flags + ["--batch_size", str(args.batch_size)] + args.vae_flags)
    data = vae.load_data(vars(run_args), device)
    train_x = data["train_x"]
    test_x = data["test_x"]
    run_args.channels = train_x.shape[1]
    run_args.image_size = train_x.shape[-1]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model = vae.to_device(vae.build_model(run_args), device)
    fused = device.type in ("cuda", "cpu")
    optimizer = torch.optim.Adam(model.parameters(), run_args.lr, fused=fused)
    step_model = model
    step = vae.train_step
    flops = flops_per_image(model, vae.to_float(train_x[: args.batch_size]))

    # Warm-up: one full epoch and a test pass, so that cuDNN's autotuning and the allocator's caches
    # are behind us.
    t0 = time.perf_counter()
    vae.train_epoch(model, optimizer, train_x, args.batch_size)
    vae.evaluate(model, test_x)
    warmup = time.perf_counter() - t0

    step_s = time_steps(step_model, optimizer, train_x, args.batch_size, step, device, args.steps)
    epoch_times, total_times = [], []
    for _ in range(args.epochs):
        t0 = time.perf_counter()
        vae.train_epoch(model, optimizer, train_x, args.batch_size)  # reads its sums: syncs
        t1 = time.perf_counter()
        vae.evaluate(model, test_x)
        epoch_times.append(t1 - t0)
        total_times.append(time.perf_counter() - t0)
    epoch, total = min(epoch_times), min(total_times)
    row = dict(
        model=name,
        flops=flops,
        step_ms=1000 * step_s,
        img_s=len(train_x) / epoch,
        epoch_s=epoch,
        total_s=total,
        limit_s=flops * len(train_x) / rate,
        warmup_s=warmup,
        mem_mb=peak_memory_mb(device),
    )
    row["util"] = flops * args.batch_size / step_s / rate
    if args.profile:
        print(f"--- where the time of a {name} training step goes (torch.profiler, 20 steps)")
        profile_steps(step_model, optimizer, train_x, args.batch_size, step, device)
    if args.loader:
        row["loader_s"] = time_dataloader_epoch(
            step_model, optimizer, args.data_dir, args.batch_size, device, args.workers
        )
    return row


def timed(command, cwd):
    """Run `command` in `cwd`: (wall seconds, its stdout); exits with its stderr if it fails."""
    t0 = time.perf_counter()
    r = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode:
        sys.exit(f"{command} failed:\n{r.stderr}")
    return wall, r.stdout


def whole_run(args):
    """Time the user's 10-epoch MLP command end to end, then pytorch/examples' if asked."""
    here = os.path.dirname(os.path.abspath(__file__))
    data_dir = os.path.abspath(args.data_dir)
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, os.path.join(here, "vae.py"), "--data_dir", data_dir]
        command += ["--model", "mlp", "--latent_dim", "20", "--epochs", "10", "--out_dir", tmp]
        wall, _ = timed(command + args.vae_flags, tmp)
        with open(os.path.join(tmp, "metrics.csv")) as f:
            rows = list(csv.DictReader(f))
        epochs = sum(float(r["seconds"]) for r in rows)
        loss = float(rows[-1]["test_neg_elbo"])
        print(
            f"vae.py MLP, 10 epochs: {wall:.1f} s = epochs {epochs:.1f} s + the rest {wall - epochs:.1f} s"
        )
        print(f"  (the rest's goal: under 3 s); test -ELBO {loss:.2f} nats per image")
        if args.examples:
            # main.py reads MNIST from ../data and writes figures into results/
            os.makedirs(os.path.join(tmp, "work", "results"))
            os.symlink(data_dir, os.path.join(tmp, "data"))
            theirs, out = timed([sys.executable, os.path.abspath(args.examples)], f"{tmp}/work")
            loss = re.findall(r"Test set loss: ([0-9.]+)", out)[-1]
            print(f"pytorch/examples' vae/main.py, 10 epochs: {theirs:.1f} s; test loss {loss}")
            print(f"vae.py is {theirs / wall:.2f}x faster (goal: 3x)")


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--data_dir", default="./mnist", help="folder holding MNIST/raw/")
    p.add_argument("--model", choices=("conv", "mlp", "both"), default="both")
    p.add_argument(
        "--latent_dim", type=int, default=20, help="20 as in pytorch/examples, for comparison"
    )
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument(
        "--profile", action="store_true", help="also print torch.profiler's operator table"
    )
    p.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), default="auto")
    p.add_argument(
        "--epochs", type=int, default=2, help="timed epochs after the warm-up; the best is kept"
    )
    p.add_argument("--steps", type=int, default=100, help="timed single steps on one fixed batch")
    p.add_argument(
        "--no_loader", dest="loader", action="store_false", help="skip the DataLoader comparison"
    )
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument(
        "--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)"
    )
    p.add_argument("--whole_run", action="store_true", help="time the user's MLP command")
    p.add_argument("--examples", metavar="PATH", help="with --whole_run: pytorch/examples' main.py")
    p.epilog = "Any other flag is vae.py's, for the models it builds (e.g. --res_blocks 1)."
    args, args.vae_flags = p.parse_known_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.whole_run:
        return whole_run(args)
    device = vae.select_device(args.device)
    rate = matmul_rate(device, torch.float32)
    name = (
        torch.cuda.get_device_name()
        if device.type == "cuda"
        else f"CPU, {torch.get_num_threads()} threads"
    )
    print(
        f"device {device} ({name}), torch {torch.__version__}, batch {args.batch_size}, fp32, "
        f"fp32 matmul rate {rate / 1e9:,.0f} GFLOP/s"
    )

    models = ("conv", "mlp") if args.model == "both" else (args.model,)
    header = (
        f"{'model':5} {'MFLOP/img':>9} {'step ms':>8} {'img/s':>9} {'epoch s':>8} {'+test s':>8} "
        f"{'limit s':>8} {'of peak':>8} {'loader s':>9} {'speed-up':>8} {'warm-up s':>9} {'peak MB':>8}"
    )
    print(header)
    for name in models:
        r = bench_model(name, args, device, rate)
        loader = (
            f"{r['loader_s']:9.2f} {r['loader_s'] / r['epoch_s']:7.1f}x"
            if args.loader
            else f"{'-':>9} {'-':>8}"
        )
        print(
            f"{name:5} {r['flops'] / 1e6:9.1f} {r['step_ms']:8.2f} {r['img_s']:9,.0f} {r['epoch_s']:8.2f} "
            f"{r['total_s']:8.2f} {r['limit_s']:8.3f} {r['util']:8.1%} {loader} {r['warmup_s']:9.1f} "
            f"{r['mem_mb']:8.0f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
