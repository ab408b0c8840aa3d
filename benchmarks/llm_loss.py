"""Time and peak memory of token-level distillation at vocabulary scale, as a Markdown table.

    python benchmarks/llm_loss.py                      # CPU sizes (N = 1024 tokens, H = 256)
    python benchmarks/llm_loss.py --vocab 32768 --tokens 2048
    python benchmarks/llm_loss.py --gpu                # N = 8192, H = 4096, V = 128,256, fp32 + bf16

One forward + backward with respect to the student's hidden states and head weight, for

- ``fused_linear_ikl``: :func:`dkl.llm.fused_linear_ikl`, chunked, no (N, V) logits;
- ``logits + ikl_loss``: materialised student and teacher logits, then :func:`dkl.ikl_loss`;
- ``logits + F.kl_div``: materialised logits, then ``F.kl_div`` (forward KL);
- ``compiled logits + F.kl_div`` (``--gpu``): the same under ``torch.compile``;
- ``Liger fused-linear JSD`` when ``liger-kernel`` is installed (CUDA only): Liger-Kernel's
  ``LigerFusedLinearJSD`` with ``jsd_beta=0`` (its forward-KL end).

Peak memory is the CUDA allocator's peak above the inputs on GPU; on CPU it is the largest running
sum of the tensor bytes allocated during the call (the profiler's memory accounting). Both sides
share one teacher forward, so the teacher's hidden states and head are inputs here.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from loss_speed import device_label, peak_extra_bytes, time_fwd_bwd

import dkl
from dkl.llm import fused_linear_ikl

HP = {"alpha": 1.0, "beta": 1.0, "temperature": 1.0, "weight_temperature": 1.0}


def candidates(ht, wt, chunk_size, gpu, impl="auto"):
    def fused(hs, ws):
        return fused_linear_ikl(hs, ws, ht, wt, chunk_size=chunk_size, impl=impl, **HP)

    def logits_ikl(hs, ws):
        with torch.no_grad():
            zt = ht @ wt.T
        return dkl.ikl_loss(hs @ ws.T, zt, **HP)

    def logits_kl_div(hs, ws):
        with torch.no_grad():
            zt = ht @ wt.T
        zs = (hs @ ws.T).float()
        return F.kl_div(
            F.log_softmax(zs, 1),
            F.log_softmax(zt.float(), 1),
            log_target=True,
            reduction="batchmean",
        )

    out = {
        "fused_linear_ikl": fused,
        "logits + ikl_loss": logits_ikl,
        "logits + F.kl_div": logits_kl_div,
    }
    if gpu:
        out["compiled logits + F.kl_div"] = torch.compile(logits_kl_div)
        try:
            from liger_kernel.transformers import LigerFusedLinearJSD
        except ImportError:
            pass
        else:  # jsd_beta = 0 is forward KL; no labels, so no token is ignored
            jsd = LigerFusedLinearJSD(jsd_beta=0.0, temperature=1.0)
            out["Liger fused-linear JSD"] = lambda hs, ws: jsd(hs, ws, ht, wt, None)
    return out


def run(tokens, hidden, vocab, dtype, device, repeats, chunk_size, gpu, impl="auto") -> None:
    g = torch.Generator().manual_seed(0)

    def rand(*shape, scale):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    hs = rand(tokens, hidden, scale=1.0).requires_grad_(True)
    ws = rand(vocab, hidden, scale=hidden**-0.5 * 3).requires_grad_(True)
    ht = rand(tokens, hidden, scale=1.0)
    wt = rand(vocab, hidden, scale=hidden**-0.5 * 3)
    cells, ms, mem = [], {}, {}
    for label, fn in candidates(ht, wt, chunk_size, gpu, impl).items():
        try:
            ms[label] = time_fwd_bwd(fn, hs, ws, repeats, device)
            mem[label] = peak_extra_bytes(fn, hs, ws, device) / 2**20
            cells.append(f"{ms[label]:.3g} ms / {mem[label]:,.0f} MiB")
        except torch.OutOfMemoryError:
            cells.append("out of memory")
            torch.cuda.empty_cache()
        except Exception as exc:  # noqa: BLE001  (one candidate's failure is its cell)
            cells.append(f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
            ms.pop(label, None)
    base = "logits + ikl_loss"
    mem_ratio = f"{mem['fused_linear_ikl'] / mem[base]:.2f}" if base in mem else "–"
    ref = "compiled logits + F.kl_div" if gpu else "logits + F.kl_div"
    t_ratio = f"{ms['fused_linear_ikl'] / ms[ref]:.2f}" if ref in ms else "–"
    name = str(dtype).removeprefix("torch.")
    print(
        f"| {tokens} × {hidden} → {vocab:,} {name} | "
        + " | ".join(cells)
        + f" | {mem_ratio} | {t_ratio} |",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--gpu", action="store_true", help="N=8192, H=4096, V=128256 on CUDA")
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, nargs="*", default=[8192, 32768, 65536])
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--impl",
        choices=("auto", "torch", "triton"),
        default="auto",
        help="fused_linear_ikl's impl; 'triton' on CPU needs TRITON_INTERPRET=1 (slow, exact)",
    )
    parser.add_argument(
        "--dtype", choices=("float32", "bfloat16"), nargs="+", default=None, help="CPU dtypes"
    )
    args = parser.parse_args()
    if args.gpu:
        if not torch.cuda.is_available():
            raise SystemExit("--gpu needs a CUDA device")
        device, shapes = torch.device("cuda"), [(8192, 4096, 128256)]
        dtypes, chunk = (torch.float32, torch.bfloat16), 1024
    else:
        device = torch.device("cpu")
        shapes = [(args.tokens, args.hidden, v) for v in args.vocab]
        dtypes = tuple(getattr(torch, d) for d in (args.dtype or ["float32"]))
        chunk = args.chunk_size
    print(
        f"device: {device_label(device)}, torch {torch.__version__}, median of up to {args.repeats} runs, "
        f"chunk_size {chunk}; cells: forward + backward time / peak extra memory\n"
    )
    header = None
    for dtype in dtypes:
        for tokens, hidden, vocab in shapes:
            if header is None:
                g = torch.zeros(1, 1, device=device)
                labels = list(candidates(g, g, chunk, args.gpu))
                ref = "compiled KL" if args.gpu else "KL"
                print(
                    "| N × H → V | "
                    + " | ".join(labels)
                    + f" | memory fused / materialised IKL | time fused / {ref} |"
                )
                print("|---|" + "---|" * (len(labels) + 2))
                header = True
            run(tokens, hidden, vocab, dtype, device, args.repeats, chunk, args.gpu, args.impl)


if __name__ == "__main__":
    main()
