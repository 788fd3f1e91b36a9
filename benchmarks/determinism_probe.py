"""Does a CPU training step give the same bits under other conditions? Trains timm's resnet10t for a
few Adam steps on fixed random batches and prints the SHA-256 of its state dict (docs/figures.md,
"What a CPU result depends on"). Run it twice per condition, e.g. ``--threads 1`` vs ``--threads 2``,
or the same thread count with and without other processes busy on the machine."""

from __future__ import annotations

import argparse
import hashlib

import timm
import torch


def probe(threads: int, steps: int = 15, size: int = 64, backbone: str = "resnet10t") -> tuple[str, float]:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    net = timm.create_model(backbone, pretrained=False, num_classes=40, in_chans=6)
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(32, 6, size, size, generator=gen)
        y = torch.randint(0, 40, (32,), generator=gen)
        loss = torch.nn.functional.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    digest = hashlib.sha256()
    for tensor in net.state_dict().values():
        digest.update(tensor.detach().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16], float(loss.detach())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--backbone", default="resnet10t")
    args = ap.parse_args()
    digest, loss = probe(args.threads, args.steps, backbone=args.backbone)
    print(f"{args.backbone}, threads {args.threads}: state {digest}, last loss {loss:.6f}")


if __name__ == "__main__":
    main()
