"""A quick probe for recipe ideas: a plain spot-only ResNet-18 loop on cached HER2ST patches.

`accuracy_her2st.py` trains through the product's trainer (validation split, epoch selection,
weight average, resumable state); one spot-only run there takes minutes and one HiFusion run
a quarter of an hour on a CPU. This script is the bare minimum instead: the spot patches of the
imported sections are read once into a cache, a ResNet-18 (ours, random init) with dropout 0.2
and a head that starts at the training mean is trained with AdamW and a per-step cosine, flips,
90° rotations and the recipe's per-channel colour jitter, and the *last* epoch is tested. It
answers "does this idea move the needle at all?" in ~5 minutes, before an idea earns a recipe
field and a real benchmark run. It reports test metrics, so it must never choose a shipped
setting by itself.

    python benchmarks/spot_probe.py --sections runs/accuracy/accuracy_her2st_work/sections \\
        --train C2 --test C3,C4 [--norm slide] [--holdout] [--seed 1]

``--norm image`` standardises each patch per channel (as the model does); ``--norm slide``
standardises by the channel mean and std of all spot patches of the patch's section.
``--hed σ`` adds the trainer's stain jitter (recipe ``hed_jitter``).
``--pcc-weight λ`` adds a correlation term to the loss: λ·(1 − mean per-gene PCC in the batch).
``--rank k`` projects the predictions onto the top k principal axes of the training targets.
``--adapt-bn`` re-estimates the BatchNorm statistics on each test section before predicting (AdaBN).
``--init TRUNK.pt`` starts the trunk from self-supervised weights (``hifusion pretrain``).
``--holdout`` drops the spatial validation blocks the trainer
would hold out, to train on the same spots as ``accuracy_her2st.py``.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hifusion_model.data.dataset import Augment, SpotDataset
from hifusion_model.data.expression import select_top_genes
from hifusion_model.data.sections import read_section, section_slide
from hifusion_model.data.splits import mixed_seed, spatial_block_split
from hifusion_model.evaluation.baselines import section_targets
from hifusion_model.evaluation.metrics import gene_pcc, mse, spot_pcc
from hifusion_model.models.backbones import resnet18_trunk
from hifusion_model.models.config import ModelConfig
from hifusion_model.models.hifusion import zscore_per_channel

MARKERS = ("ERBB2", "KRT19", "CD74")


def load_patches(folder: Path, names: Sequence[str], train: Sequence[str], cache: Path) -> dict:
    """Spot patches (uint8), centres and targets of ``names``; genes from the training sections."""
    if cache.exists():
        data = dict(np.load(cache, allow_pickle=False))
        if all(f"{n}_spot" in data for n in names):
            return data
    sections = {n: read_section(folder / f"{n}.h5ad") for n in names}
    genes = select_top_genes([sections[n] for n in train], 250)
    config = ModelConfig(genes=genes)
    data: dict = {"genes": np.array(genes)}
    for n, section in sections.items():
        dataset = SpotDataset(section, section_slide(section), config, raw=True)
        data[f"{n}_spot"] = np.stack([dataset[i]["spot"].numpy() for i in range(len(dataset))])
        data[f"{n}_xy"] = np.asarray(section.obsm["spatial"], np.float64)
        data[f"{n}_y"] = section_targets(section, genes, config.normalization)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, **data)
    return data


def colour_stats(patches: np.ndarray) -> torch.Tensor:
    """Per-channel mean and std of a section's spot patches, one ``(6,)`` row per patch."""
    x = torch.from_numpy(patches).float() / 255
    row = torch.cat([x.mean(dim=(0, 2, 3)), x.std(dim=(0, 2, 3))])
    return row.expand(len(patches), 6).clone()


class SpotNet(nn.Module):
    def __init__(self, n_genes: int, norm: str) -> None:
        super().__init__()
        self.norm = norm
        self.trunk = resnet18_trunk()
        self.head = nn.Sequential(nn.Dropout(0.2), nn.Linear(512, n_genes))

    def forward(self, x: torch.Tensor, stats: torch.Tensor) -> torch.Tensor:
        x = x.float() / 255
        if self.norm == "image":
            x = zscore_per_channel(x)
        else:
            x = (x - stats[:, :3, None, None]) / stats[:, 3:, None, None]
        return self.head(self.trunk(x).mean(dim=(-2, -1))).float()


def augment(x: torch.Tensor, jitter: float, gen: torch.Generator, hed: float = 0.0) -> torch.Tensor:
    """Random flips, 90° rotation, per-channel gain/bias and stain (HED) jitter of one uint8
    patch, as float in [0, 255]; the stain jitter is the trainer's (``dataset.Augment``)."""
    flips = torch.rand(3, generator=gen)
    if flips[0] < 0.5:
        x = x.flip(-1)
    if flips[1] < 0.5:
        x = x.flip(-2)
    x = torch.rot90(x, int(4 * flips[2]) % 4, (-2, -1)).float()
    gain = 1 + (2 * torch.rand(3, 1, 1, generator=gen) - 1) * jitter
    bias = (2 * torch.rand(3, 1, 1, generator=gen) - 1) * jitter / 2 * 255
    x = (x * gain + bias).clamp(0, 255)
    if not hed:
        return x
    rng = np.random.default_rng(int(torch.randint(2**31, (1,), generator=gen)))
    hwc = x.permute(1, 2, 0).numpy() / 255
    stained, _ = Augment(flips=False, rotations=False, hed_sigma=hed)(hwc, hwc[:1, :1], rng)
    return torch.from_numpy(stained).permute(2, 0, 1) * 255


def training_set(data: dict, train: Sequence[str], args: argparse.Namespace):
    xs, ys, stats = [], [], []
    for k, n in enumerate(train):
        keep = np.ones(len(data[f"{n}_y"]), bool)
        if args.holdout:
            keep = ~spatial_block_split(data[f"{n}_xy"], fraction=0.15, grid=4,
                                        seed=mixed_seed(args.seed, k))
        xs.append(data[f"{n}_spot"][keep])
        ys.append(data[f"{n}_y"][keep])
        stats.append(colour_stats(data[f"{n}_spot"])[keep])
    return (torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys)),
            torch.cat(stats))


def low_rank_readout(y: torch.Tensor, rank: int) -> nn.Linear:
    """A fixed projection onto the top ``rank`` principal axes of the training targets ``y``:
    appended to the head, it keeps only the gene covariation the training data shows."""
    mean = y.mean(0)
    axes = torch.linalg.svd(y - mean, full_matrices=False).Vh[:rank]  # (rank, G)
    readout = nn.Linear(y.shape[1], y.shape[1])
    with torch.no_grad():
        readout.weight.copy_(axes.T @ axes)
        readout.bias.copy_(mean - axes.T @ axes @ mean)
    readout.requires_grad_(False)
    return readout


def batch_gene_pcc(pred: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Mean over genes of the PCC across the batch's spots, differentiable even where a
    gene's predictions are still constant (as they are at the first step)."""
    p, t = pred - pred.mean(0), truth - truth.mean(0)
    norm = ((p.square().sum(0) + 1e-4) * (t.square().sum(0) + 1e-4)).sqrt()
    return ((p * t).sum(0) / norm).mean()


@torch.no_grad()
def adapt_batchnorm(net: SpotNet, patches: np.ndarray) -> SpotNet:
    """A copy of ``net`` whose BatchNorm statistics are those of ``patches`` (AdaBN)."""
    net = copy.deepcopy(net)
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # a plain average over the section's batches
    net.train()
    stats = colour_stats(patches)
    for s in range(0, len(patches), 32):
        with torch.autocast("cpu", torch.bfloat16):
            net(torch.from_numpy(patches[s:s + 32]), stats[s:s + 32])
    return net


@torch.inference_mode()
def predict(net: SpotNet, patches: np.ndarray) -> np.ndarray:
    net.eval()
    stats, out = colour_stats(patches), []
    for s in range(0, len(patches), 32):
        with torch.autocast("cpu", torch.bfloat16):
            out.append(net(torch.from_numpy(patches[s:s + 32]), stats[s:s + 32]))
    return torch.cat(out).numpy()


def scores(pred: np.ndarray, truth: np.ndarray, genes: list[str]) -> dict:
    per_gene = gene_pcc(pred, truth)
    row = {"mse": mse(pred, truth), "spot_pcc": spot_pcc(pred, truth),
           "gene_pcc": float(np.nanmean(per_gene))}
    row.update({g: float(per_gene[genes.index(g)]) for g in MARKERS if g in genes})
    return row


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sections", type=Path, required=True, help="folder of imported SECTION.h5ad")
    p.add_argument("--train", default="C2")
    p.add_argument("--test", default="C3,C4")
    p.add_argument("--cache", type=Path, help="patch cache (default: runs/spot_probe/TRAIN.npz; "
                   "the gene panel depends on the training sections)")
    p.add_argument("--norm", choices=("image", "slide"), default="image")
    p.add_argument("--holdout", action="store_true")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--jitter", type=float, default=0.05)
    p.add_argument("--hed", type=float, default=0.0, help="stain jitter σ (recipe hed_jitter)")
    p.add_argument("--pcc-weight", type=float, default=0.0,
                   help="add λ·(1 − mean per-gene PCC over the batch) to the MSE")
    p.add_argument("--rank", type=int, default=0,
                   help="predict through the top RANK principal axes of the training targets")
    p.add_argument("--adapt-bn", action="store_true",
                   help="re-estimate BatchNorm statistics on each test section before predicting")
    p.add_argument("--init", type=Path, metavar="TRUNK.pt",
                   help="start the trunk from these weights (hifusion pretrain --out)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    train, test = args.train.split(","), args.test.split(",")
    cache = args.cache or Path("runs/spot_probe") / f"{'-'.join(train)}.npz"
    data = load_patches(args.sections, train + test, train, cache)
    genes = [str(g) for g in data["genes"]]
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    x, y, stats = training_set(data, train, args)
    net = SpotNet(len(genes), args.norm)
    if args.init:
        net.trunk.load_state_dict(torch.load(args.init, weights_only=True))
    with torch.no_grad():
        net.head[1].weight.zero_()
        net.head[1].bias.copy_(y.mean(0))
    if args.rank:
        net.head.append(low_rank_readout(y, args.rank))
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=1e-2)
    steps = args.epochs * -(-len(x) // args.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 * (1 + np.cos(np.pi * t / steps)))
    start = time.perf_counter()
    for epoch in range(args.epochs):
        net.train()
        for idx in torch.randperm(len(x), generator=gen).split(args.batch_size):
            if len(idx) < 2:
                continue
            batch = torch.stack([augment(x[i], args.jitter, gen, args.hed) for i in idx])
            with torch.autocast("cpu", torch.bfloat16):
                out = net(batch, stats[idx])
                loss = F.mse_loss(out, y[idx])
                if args.pcc_weight:
                    loss = loss + args.pcc_weight * (1 - batch_gene_pcc(out, y[idx]))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        print(f"epoch {epoch + 1}: loss {loss.item():.4f}, {time.perf_counter() - start:.0f} s",
              flush=True)
    results = {"args": {k: str(v) for k, v in vars(args).items()}, "n_train": len(x)}
    for n in test:
        model = adapt_batchnorm(net, data[f"{n}_spot"]) if args.adapt_bn else net
        results[n] = scores(predict(model, data[f"{n}_spot"]), data[f"{n}_y"], genes)
        print(n, json.dumps({k: round(v, 4) for k, v in results[n].items()}))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
