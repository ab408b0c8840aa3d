"""Forward+backward time and peak extra memory of the losses, printed as Markdown tables.

    python benchmarks/loss_speed.py                 # both tables on the current device
    python benchmarks/loss_speed.py --shapes 256x1000 --repeats 50
    python benchmarks/loss_speed.py --kd-only       # the distillation table alone

The first table compares ``dkl.ikl_loss`` and ``dkl.kl_loss`` with ``F.kl_div`` and with the
authors' pairwise B×C×C wMSE, both logits requiring grad. The pairwise formula is skipped (and the
table says so) where its three B×C×C temporaries would not fit in the memory budget. Peak extra
memory is the CUDA allocator's peak above the inputs on GPU, and the largest tensor bytes allocated
during the call on CPU (traced with the profiler's memory accounting).

The second table is the distillation case: the teacher's logits are detached, only the student's
get a gradient, and ``F.kl_div(log_softmax(s / T), log_softmax(t / T), log_target=True,
reduction="batchmean")`` is the reference, with ``T = 4`` and IKL's CIFAR-100 setting (``alpha``
1, ``beta`` 8, ``weight_temperature`` 100). On CPU it runs on ``--kd-threads`` threads (one by
default). The three candidates are timed interleaved (one round of each, then the next round),
and each cell is the median over the rounds.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import dkl

SHAPES = [(128, 100), (256, 1000), (64, 4000), (8, 32000), (4, 128000), (64, 200000)]
PAIRWISE_BUDGET = 16 * 2**30  # bytes the pairwise formula may take (it peaks near 12 B·C·C floats)


def pairwise_ikl(zs, zt, alpha=1.0, beta=1.0, T=1.0):
    """The authors' way: the wMSE through (B, C, C) differences."""
    w = torch.softmax(zt.detach(), dim=1)
    dt = zt.unsqueeze(2) - zt.unsqueeze(1)
    ds = zs.unsqueeze(2) - zs.unsqueeze(1)
    wmse = 0.25 * (w.unsqueeze(2) * w.unsqueeze(1) * (dt - ds) ** 2).sum(dim=(1, 2))
    p = torch.softmax(zt.detach() / T, dim=1)
    sce = -(p * torch.log_softmax(zs / T, dim=1)).sum(dim=1)
    return (beta * wmse + alpha * sce).mean()


CANDIDATES = {
    "F.kl_div": lambda zs, zt: F.kl_div(
        F.log_softmax(zs, 1), F.softmax(zt, 1), reduction="batchmean"
    ),
    "dkl.kl_loss": lambda zs, zt: dkl.kl_loss(zs, zt),
    "dkl.ikl_loss": lambda zs, zt: dkl.ikl_loss(zs, zt, beta=8.0, temperature=4.0),
    "pairwise (authors)": lambda zs, zt: pairwise_ikl(zs, zt, beta=8.0, T=4.0),
}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def device_label(device: torch.device) -> str:
    """The GPU's name, or the CPU with the threads torch uses."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({torch.get_num_threads()} threads)"


def time_fwd_bwd(fn, zs, zt, repeats, device):
    def once():
        loss = fn(zs, zt)
        loss.backward()
        zs.grad = zt.grad = None

    once()  # warm-up
    times = []
    budget_end = time.perf_counter() + 10.0  # never spend more than ~10 s on one cell
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        once()
        _sync(device)
        times.append(time.perf_counter() - t0)
        if time.perf_counter() > budget_end:
            break
    return statistics.median(times) * 1e3


def peak_extra_bytes(fn, zs, zt, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn(zs, zt).backward()
        zs.grad = zt.grad = None
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    import contextlib
    import os
    import sys

    from torch.profiler import ProfilerActivity, profile

    # the CPU profiler's C++ side prints start/stop lines to fd 2: keep the table readable
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull, contextlib.ExitStack() as stack:
        os.dup2(devnull.fileno(), 2)
        stack.callback(os.dup2, saved, 2)
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn(zs, zt).backward()
    os.close(saved)
    zs.grad = zt.grad = None
    # running sum of allocations/frees in event order gives the peak above the start
    events = sorted(
        (e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start
    )
    current = peak = 0
    for e in events:
        current += e.self_cpu_memory_usage
        peak = max(peak, current)
    return peak


KD_SHAPES = [(256, 100), (256, 1000), (64, 4000), (64, 32000)]
KD_T, KD_T2, KD_BETA = 4.0, 100.0, 8.0
KD_CANDIDATES = {
    "F.kl_div": lambda zs, zt: F.kl_div(
        F.log_softmax(zs / KD_T, 1),
        F.log_softmax(zt / KD_T, 1),
        log_target=True,
        reduction="batchmean",
    ),
    "dkl.kl_loss": lambda zs, zt: dkl.kl_loss(zs, zt, temperature=KD_T),
    "dkl.ikl_loss": lambda zs, zt: dkl.ikl_loss(
        zs, zt, beta=KD_BETA, temperature=KD_T, weight_temperature=KD_T2
    ),
}


def kd_times(shape, rounds, device, seconds_per_call=0.02):
    """Median fwd+bwd milliseconds of each KD candidate, timed interleaved over ``rounds``."""
    B, C = shape
    g = torch.Generator(device="cpu").manual_seed(0)
    zs = torch.randn(B, C, generator=g).mul(3).to(device).requires_grad_()
    zt = torch.randn(B, C, generator=g).mul(3).to(device)  # the teacher: no gradient

    def once(fn):
        fn(zs, zt).backward()
        zs.grad = None

    calls = {}
    for label, fn in KD_CANDIDATES.items():  # warm-up, and calls per round of ~20 ms
        once(fn)
        _sync(device)
        t0 = time.perf_counter()
        once(fn)
        _sync(device)
        calls[label] = max(1, int(seconds_per_call / max(time.perf_counter() - t0, 1e-6)))
    times = {label: [] for label in KD_CANDIDATES}
    for _ in range(rounds):
        for label, fn in KD_CANDIDATES.items():
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(calls[label]):
                once(fn)
            _sync(device)
            times[label].append((time.perf_counter() - t0) / calls[label] * 1e3)
    return {label: statistics.median(v) for label, v in times.items()}


def kd_table(shapes, rounds, device, threads):
    if device.type == "cpu":
        saved = torch.get_num_threads()
        torch.set_num_threads(threads)
    try:
        print(
            f"\nKD case (teacher detached, T = {KD_T:g}; IKL beta {KD_BETA:g}, "
            f"weight_temperature {KD_T2:g}), device: {device_label(device)}, float32, "
            f"median of {rounds} interleaved rounds\n"
        )
        print(
            "| B × C | F.kl_div | dkl.kl_loss | dkl.ikl_loss | kl_loss / kl_div "
            "| ikl_loss / kl_div |"
        )
        print("|---|---|---|---|---|---|")
        for B, C in shapes:
            ms = kd_times((B, C), rounds, device)
            kd, kl, ikl = ms["F.kl_div"], ms["dkl.kl_loss"], ms["dkl.ikl_loss"]
            print(
                f"| {B} × {C} | {kd:.3g} ms | {kl:.3g} ms | {ikl:.3g} ms "
                f"| {kl / kd:.2f} | {ikl / kd:.2f} |",
                flush=True,
            )
    finally:
        if device.type == "cpu":
            torch.set_num_threads(saved)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shapes", nargs="*", help="BxC shapes, e.g. 256x1000")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--kd-only", action="store_true", help="only the distillation table")
    parser.add_argument("--kd-rounds", type=int, default=15, help="interleaved rounds per cell")
    parser.add_argument("--kd-threads", type=int, default=1, help="CPU threads of the KD table")
    args = parser.parse_args()
    device = torch.device(args.device)
    parse = lambda specs: [tuple(int(v) for v in s.split("x")) for s in specs]
    shapes = parse(args.shapes) if args.shapes else SHAPES
    if args.kd_only:
        kd_table(
            parse(args.shapes) if args.shapes else KD_SHAPES,
            args.kd_rounds,
            device,
            args.kd_threads,
        )
        return
    print(
        f"device: {device_label(device)}, torch {torch.__version__}, float32, median of up to {args.repeats} runs\n"
    )
    print("| B × C | " + " | ".join(CANDIDATES) + " | ikl / kl_div | pairwise / ikl |")
    print("|---|" + "---|" * (len(CANDIDATES) + 2))
    for B, C in shapes:
        g = torch.Generator(device="cpu").manual_seed(0)
        zs = torch.randn(B, C, generator=g).mul(3).to(device).requires_grad_()
        zt = torch.randn(B, C, generator=g).mul(3).to(device).requires_grad_()
        cells, ms = [], {}
        for label, fn in CANDIDATES.items():
            if label.startswith("pairwise") and 12 * B * C * C * 4 > PAIRWISE_BUDGET:
                cells.append(f"skipped: needs ~{12 * B * C * C * 4 / 2**30:,.0f} GiB")
                continue
            t = time_fwd_bwd(
                fn, zs, zt, args.repeats if not label.startswith("pairwise") else 3, device
            )
            mem = peak_extra_bytes(fn, zs, zt, device)
            ms[label] = t
            cells.append(f"{t:.3g} ms / {mem / 2**20:.3g} MiB")
        ratio = ms["dkl.ikl_loss"] / ms["F.kl_div"]
        speedup = (
            f"{ms['pairwise (authors)'] / ms['dkl.ikl_loss']:.0f}×"
            if "pairwise (authors)" in ms
            else "–"
        )
        print(f"| {B} × {C} | " + " | ".join(cells) + f" | {ratio:.2f} | {speedup} |", flush=True)
    kd_table(
        parse(args.shapes) if args.shapes else KD_SHAPES, args.kd_rounds, device, args.kd_threads
    )


if __name__ == "__main__":
    main()
