"""Cost of the FCR term in training: one optimizer step with λ > 0 against the λ = 0 control.

FLOPs of forward + backward are counted with ``torch.utils.flop_counter``; wall time is the
median of interleaved repeats (a synchronised clock on CPU, CUDA events on GPU). The UNet has
random weights and the conditioning is random-normal: cost does not depend on either, so these
rows measure cost only. The expected FLOP ratio is about 1 + encoder_share x (1/3 of a training
step's work is the forward pass, and FCR adds an encoder forward + backward).

    python benchmarks/bench_train_step.py --architecture base --batch 128 --repeats 5
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd
import torch
from torch.utils.flop_counter import FlopCounterMode

from fcr.core.loss import FCRConfig, fcr_training_loss
from fcr.eval.profiling import environment_info, time_fn, unet_flops
from fcr.backends.models import MINILM_HIDDEN_SIZE, build_embedded_unet, build_noise_scheduler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--architecture", default="base")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--out", default="benchmarks/results/bench_train_step")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    device = torch.device(args.device)
    unet = build_embedded_unet(args.architecture).to(device)
    sched = build_noise_scheduler()
    x0 = (torch.rand(args.batch, 1, 32, 32) * 2 - 1).to(device)
    cond = torch.randn(args.batch, 16, MINILM_HIDDEN_SIZE).to(device)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-5)

    def step(lam: float, seed: int = 0) -> None:
        parts = fcr_training_loss(unet, sched, x0, cond, FCRConfig(lambda_fcr=lam), torch.Generator().manual_seed(seed))
        parts.total.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    rows = []
    for lam in (0.0, 0.1):
        with FlopCounterMode(display=False) as counter:
            parts = fcr_training_loss(unet, sched, x0, cond, FCRConfig(lambda_fcr=lam), torch.Generator().manual_seed(0))
            parts.total.backward()
        opt.zero_grad(set_to_none=True)
        rows.append({"lambda_fcr": lam, "gflops_per_step": counter.get_total_flops() / 1e9})
    # Interleave the timed repeats so machine-load changes hit both alike.
    times = {0.0: [], 0.1: []}
    for lam in times:  # warm-up (kernels, allocator)
        step(lam)
    for _ in range(args.repeats):
        for lam in times:
            times[lam].append(time_fn(lambda: step(lam), warmup=0, repeats=1, device=device)["median_s"])
    share = unet_flops(unet, (1, 32, 32), 16)["encoder_share"]
    for row in rows:
        t = pd.Series(times[row["lambda_fcr"]])
        row.update(step_s_median=t.median(), images_per_s=args.batch / t.median(), repeats=len(t))
    df = pd.DataFrame(rows)
    df["flops_ratio_vs_lambda0"] = df["gflops_per_step"] / df["gflops_per_step"].iloc[0]
    df["time_ratio_vs_lambda0"] = df["step_s_median"] / df["step_s_median"].iloc[0]
    df["encoder_share"] = share
    df["architecture"], df["batch"] = args.architecture, args.batch
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(out.with_suffix(".csv"), index=False)
    out.with_suffix(".env.json").write_text(json.dumps({**environment_info(device), "args": vars(args)}, indent=2, default=str))
    print(df.to_string(index=False))


if __name__ == "__main__":
    main()
