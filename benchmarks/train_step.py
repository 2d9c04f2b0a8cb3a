"""Cost of one local training step: DP-SGD (Opacus) beside the same step without DP.

Both are timed in the same process on the same batches of the same model:

    python benchmarks/train_step.py                         # the shipped backbone and set
    python benchmarks/train_step.py --backbone small --size 32 --channels 1 --trainable all
    python benchmarks/train_step.py --device cuda --amp     # on a GPU, bf16 autocast
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from dataclasses import replace

import numpy as np
import torch

from client.round import freeze_unreachable, local_training
from client.tasks import get_task
from medmeta_common.config import ImageConfig, ModelConfig, TrainConfig
from medmeta_common.data.records import SiteData
from medmeta_common.models.factory import build_encoder, freeze_all_but
from medmeta_common.models.heads import CosineClassifier, EncoderWithHead
from medmeta_common.privacy.dp_sgd import DPSettings


def site(n: int, size: int, classes: int, channels: int) -> SiteData:
    rng = np.random.default_rng(0)
    return SiteData(images=rng.random((n, channels, size, size)).astype(np.float32),
                    labels=rng.integers(0, classes, n), classes=tuple(map(str, range(classes))),
                    groups=np.arange(n).astype(str), refs=tuple(map(str, range(n))))


def timed(data: SiteData, args: argparse.Namespace, dp: DPSettings | None) -> float:
    image = ImageConfig(size=args.size, channels=args.channels)
    weights = "imagenet" if args.backbone == "efficientnet_lite0" else "none"
    pool = tuple(int(p) for p in args.pool.split(","))
    encoder = build_encoder(ModelConfig(backbone=args.backbone, weights=weights, pool=pool),
                            image, seed=0)
    freeze_all_but(encoder, args.trainable)
    task = get_task("classification")
    freeze_unreachable(encoder, task)  # as a site round does
    model = EncoderWithHead(encoder, CosineClassifier(encoder.embedding_dim, len(data.classes)))
    train = TrainConfig(local_steps=args.steps, batch_size=args.batch, augment=False,
                        trainable=args.trainable)
    device = torch.device(args.device)
    warm = replace(train, local_steps=3)
    local_training(task, model, data, warm, dp=dp, seed=1, device=device, amp=args.amp,
                   units=None)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    local_training(task, model, data, train, dp=dp, seed=2, device=device, amp=args.amp,
                   units=None)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / args.steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", action="store_true")
    parser.add_argument("--backbone", default="efficientnet_lite0",
                        choices=("small", "large", "efficientnet_lite0"))
    parser.add_argument("--trainable", default="film",
                        choices=("all", "film", "film_shift", "film_last_stage"))
    # Defaults: the shipped method (configs/benchmark.yaml).
    parser.add_argument("--pool", default="5", help="pooled feature maps (lite0), comma list")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=5,
                        help="alternating timings of each; the medians are compared")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    data = site(max(4000, args.batch * 20), args.size, 5, args.channels)
    dp = DPSettings(noise_multiplier=1.0, sample_rate=args.batch / len(data), max_grad_norm=1.0)
    # Alternate the two so that a noisy neighbour or a clock change hits both alike.
    plains, privates = [], []
    for _ in range(args.repeats):
        plains.append(timed(data, args, None))
        privates.append(timed(data, args, dp))
    plain, private = statistics.median(plains), statistics.median(privates)
    name = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu"
    print(f"# train step: {args.backbone} encoder (trainable: {args.trainable}, pool "
          f"{args.pool}), "
          f"{args.size}x{args.size}x{args.channels}, expected batch "
          f"{args.batch}, {args.device} ({name}), amp={args.amp}, torch {torch.__version__}, "
          f"threads={torch.get_num_threads()}")
    print(f"non-private step  {1000 * plain:8.1f} ms   {args.batch / plain:9.0f} images/s"
          "  (baseline)")
    print(f"DP-SGD step       {1000 * private:8.1f} ms   {args.batch / private:9.0f} images/s")
    print(f"DP / non-private  {private / plain:8.2f}x   (medians of {args.repeats} alternating "
          f"runs of {args.steps} steps)")


if __name__ == "__main__":
    main()
