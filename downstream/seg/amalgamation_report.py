"""What a trained variant mixer learned: per layer, which variant wins on which channels and, with per-pixel
assigners, where in the image. train-seg writes it next to the final weights:

    RUN/amalgamation.safetensors   per layer (and assigner j): ``LAYER/aJ/mean`` [V, C], the variant weights
                                   averaged over the summary images (and pixels); per-pixel assigners also
                                   ``LAYER/aJ/maps`` [N, V, h, w], the channel-mean weights of N images;
                                   metadata: variants, layers, assigners, form, the images' keys
    RUN/amalgamation.png           per layer: the [V, C] weights of each assigner (the share of channels each
                                   variant wins in the title) and, per pixel, the winning variant on one image
                                   beside its mask

`VariantSum` (``weighted``) has one input-independent [V, C] per layer: its weights are stored as ``aJ`` = a0.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from difffeat.spine.run import RunFolder
from downstream.plots import save_figure
from downstream.seg.amalgamate import Amalgamation
from downstream.seg.data import SegDataset, collate

SUMMARY_IMAGES = 16
MAPPED_IMAGES = 4


@torch.no_grad()
def amalgamation_summary(model, dataset: SegDataset, images: int = SUMMARY_IMAGES,
                         mapped: int = MAPPED_IMAGES, batch_size: int = 8) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, metadata) as described in the module doc, from up to `images` images spread over `dataset`."""
    mixer = model.amalgamate
    layout = mixer.layout
    picks = sorted(set(np.linspace(0, len(dataset) - 1, min(images, len(dataset))).round().astype(int).tolist()))
    meta = {"variants": list(layout.names), "layers": list(layout.layers), "keys": [dataset.keys[i] for i in picks],
            "form": getattr(mixer, "form", "static"), "assigners": getattr(mixer, "n", 1)}
    if not isinstance(mixer, Amalgamation):  # weighted: one input-independent weight per channel
        return {f"{layer}/a0/mean": w.detach().float().cpu() for layer, w in zip(layout.layers, mixer.weights())}, meta
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    sums: dict[str, torch.Tensor] = {}
    maps: dict[str, list[torch.Tensor]] = {}
    for start in range(0, len(picks), batch_size):
        batch = collate([dataset[i] for i in picks[start:start + batch_size]])
        feats = [f.to(device) for f in batch["features"]]
        if model.norm is not None:
            feats = model.norm(feats)
        for layer, ws in zip(layout.layers, mixer.weights(feats)):
            for j, w in enumerate(ws):  # [B, V, C, h, w]
                name = f"{layer}/a{j}"
                sums[name] = sums.get(name, 0) + w.float().mean(dim=(3, 4)).sum(0).cpu()
                if mixer.form == "pixel" and start < mapped:
                    maps.setdefault(name, []).append(w.float().mean(2).cpu())
    model.train(was_training)
    tensors = {f"{name}/mean": s / len(picks) for name, s in sums.items()}
    tensors.update({f"{name}/maps": torch.cat(m)[:mapped] for name, m in maps.items()})
    meta["mapped_keys"] = meta["keys"][:mapped] if maps else []
    return tensors, meta


def write_amalgamation_report(folder: RunFolder, model, dataset: SegDataset) -> None:
    """amalgamation.safetensors and amalgamation.png into the run folder."""
    tensors, meta = amalgamation_summary(model, dataset)
    folder.save_tensors("amalgamation.safetensors", tensors, meta)
    mask = dataset.mask(dataset.keys.index(meta["mapped_keys"][0])) if meta.get("mapped_keys") else None
    save_amalgamation_png(tensors, meta, folder.file("amalgamation.png"), mask)


def _shares(mean: torch.Tensor, names: Sequence[str]) -> str:
    won = torch.bincount(mean.argmax(0), minlength=len(names)).float() / mean.shape[1]
    return " · ".join(f"{n} {100 * s:.0f}%" for n, s in zip(names, won.tolist()))


def save_amalgamation_png(tensors: dict[str, torch.Tensor], meta: dict, path, mask: torch.Tensor | None = None) -> None:
    """One row per layer: each assigner's [V, C] mean weights; with per-pixel weights, the winning variant at
    every pixel of the first summary image and that image's mask."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    names, layers, n = meta["variants"], meta["layers"], int(meta["assigners"])
    pixel = any(k.endswith("/maps") for k in tensors)
    cols = n + (2 if pixel else 0)
    fig, axes = plt.subplots(len(layers), cols, figsize=(3.4 * cols + 1, 1.2 + 2.2 * len(layers)), squeeze=False,
                             layout="constrained")
    colours = ListedColormap(plt.get_cmap("tab10").colors[: len(names)])
    for row, layer in enumerate(layers):
        for j in range(n):
            ax = axes[row, j]
            mean = tensors[f"{layer}/a{j}/mean"]
            im = ax.imshow(mean.numpy(), aspect="auto", vmin=0, vmax=1, cmap="viridis", interpolation="nearest")
            ax.set_yticks(range(len(names)), names, fontsize=7)
            ax.set_xlabel("channel", fontsize=7)
            ax.set_title(f"{layer} · assigner {j}\n{_shares(mean, names)}", fontsize=7)
        if pixel:
            winner = tensors[f"{layer}/a0/maps"][0].argmax(0)
            ax = axes[row, n]
            ax.imshow(winner.numpy(), cmap=colours, vmin=-0.5, vmax=len(names) - 0.5, interpolation="nearest")
            ax.set_title(f"winning variant (assigner 0)\n{meta['mapped_keys'][0]}", fontsize=7)
            ax.set_axis_off()
            ax = axes[row, n + 1]
            if mask is not None:
                ax.imshow(mask.numpy(), cmap="tab20", interpolation="nearest")
                ax.set_title("mask", fontsize=7)
            ax.set_axis_off()
    fig.colorbar(im, ax=axes[:, :n].ravel().tolist(), fraction=0.02, label="weight")
    if pixel:
        handles = [Patch(color=colours(i), label=nm) for i, nm in enumerate(names)]
        fig.legend(handles=handles, loc="outside lower center", fontsize=7, ncol=len(names))
    fig.suptitle("learned variant weights per layer (rows: variants, columns: channels)", fontsize=9)
    save_figure(fig, path)
