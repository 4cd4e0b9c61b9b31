"""CAP + SAP loss time (forward + backward): the vectorised losses against a loop transcription of the official code.

The vectorised losses run in the official code's mode (raw-CAM ranking, absent classes zeroed, every patch an
anchor, exp before /tau in SAP's negatives), so both sides compute the same number; the script checks that first.
Paper shapes: B = 8 images of 14 x 14 patches, 256-d projections, k = 20/5 (SAP) and 5/20 (CAP).

    python benchmarks/bench_cobra_losses.py [--device cuda] [--repeats 5]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from common import write_result
from wsss.train.cobra_losses import cap_loss, sap_loss
from wsss.train.official_loops import official_cap_loop, official_sap_loop


def inputs(b: int, side: int, dim: int, classes: int, device: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    n = side * side
    v_s = F.normalize(torch.randn(b, dim, side, side, generator=g), dim=1).to(device)
    v_c = F.normalize(torch.randn(b, dim, side, side, generator=g), dim=1).to(device)
    m_cnn = torch.randn(b, classes + 1, side, side, generator=g).to(device)
    labels = (torch.rand(b, classes, generator=g) < 0.15).float().to(device)
    labels[:, 0] = 1
    affinity = torch.rand(b, n, n, generator=g).softmax(-1).to(device)
    return v_s, v_c, m_cnn, labels, affinity


NEEDS_GRAD = (True, True, False, False, False)  # the projections v^s, v^c; CAMs and affinities give indices only


def vectorised(v_s, v_c, m_cnn, labels, affinity):
    tokens = lambda v: v.flatten(2).transpose(1, 2)  # noqa: E731  (B, D, h, w) -> (B, N, D)
    sap = sap_loss(tokens(v_s), m_cnn, labels, 20, 5, 0.1, "raw_cam", "zero", "all", "code")
    return sap + cap_loss(tokens(v_c), affinity, 5, 20, 0.1)


def official(v_s, v_c, m_cnn, labels, affinity):
    return official_sap_loop(v_s, m_cnn, labels) + official_cap_loop(v_c, affinity)


def timed(fn, args, repeats: int, device: str) -> float:
    """Median seconds of forward + backward."""
    times = []
    for _ in range(repeats + 1):  # one warm-up
        leaves = [a.detach().requires_grad_(grad) for a, grad in zip(args, NEEDS_GRAD, strict=True)]
        _sync(device)
        tic = time.perf_counter()
        fn(*leaves).sum().backward()
        _sync(device)
        times.append(time.perf_counter() - tic)
    return sorted(times[1:])[len(times[1:]) // 2]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    rows = []
    for side, dim in [(14, 256), (28, 256)]:
        data = inputs(args.batch, side, dim, 20, args.device)
        want, got = official(*data), vectorised(*data)
        torch.testing.assert_close(got.reshape(()), want.reshape(()), rtol=1e-4, atol=1e-5)
        t_vec = timed(vectorised, data, args.repeats, args.device)
        t_loop = timed(official, data, args.repeats, args.device)
        row = {"B": args.batch, "N": side * side, "D": dim, "vectorised_s": t_vec, "official_loop_s": t_loop,
               "speedup": t_loop / t_vec, "loss": float(got)}  # fmt: skip
        rows.append(row)
        print(f"B={args.batch} N={side * side:4d} D={dim}: vectorised {1000 * t_vec:8.1f} ms   official loop "
              f"{1000 * t_loop:8.1f} ms   speedup {t_loop / t_vec:6.1f}x   (same loss {float(got):.5f})")  # fmt: skip
    write_result(f"bench_cobra_losses_{args.device.split(':')[0]}", {"rows": rows, "repeats": args.repeats})


if __name__ == "__main__":
    main()
