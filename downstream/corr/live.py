"""`difffeat match IMG_A IMG_B`: two images' features extracted live (`difffeat.FeatureExtractor`), a grid of source
points (or the points given) matched into the target at its own pixels, and the matches drawn.

Each image is brought to the extraction frame by `resize` (its `Placement` recorded), so points are given and drawn
in each image's own pixels; a source point that a centre crop hides is dropped, with a note.
"""

from __future__ import annotations

import numpy as np
import torch

from difffeat.data.geometry import placement
from difffeat.errors import UserError
from difffeat.spine.run import check_new_file
from downstream.corr import points as P
from downstream.corr.config import MatchConfig
from downstream.corr.match import match_points


def parse_points(texts: list[str]) -> np.ndarray:
    """``["x,y", …]`` → ``[N, 2]``; one clear error naming a malformed entry."""
    out = []
    for text in texts:
        parts = str(text).replace(" ", "").split(",")
        try:
            if len(parts) != 2:
                raise ValueError
            out.append((float(parts[0]), float(parts[1])))
        except ValueError:
            raise UserError(f"--points: {text!r} is not X,Y in pixels") from None
    return np.array(out, np.float64).reshape(-1, 2)


def grid_points(size: tuple[int, int], n: int) -> np.ndarray:
    """An n × n grid of pixel positions, at the centres of an n × n division of an image of `size` = (H, W)."""
    h, w = size
    xs = (np.arange(n) + 0.5) * w / n - 0.5
    ys = (np.arange(n) + 0.5) * h / n - 0.5
    gx, gy = np.meshgrid(xs, ys)
    return np.stack([gx.ravel(), gy.ravel()], 1)


def match_images(config: MatchConfig, progress: bool = True) -> dict:
    """Extract, match and draw (module doc); returns the points, their matches (target pixels), cosines and notes."""
    from difffeat import FeatureExtractor, load_pipeline
    from difffeat.data.images import load_image, resize_image, to_tensor
    from difffeat.models.layers import native_resolution
    from downstream.corr.draw import MatchPicture, save_pictures

    out = check_new_file(config.out, config.overwrite, "picture")
    device = "cuda" if config.device == "auto" and torch.cuda.is_available() else (
        "cpu" if config.device == "auto" else config.device)
    images = [load_image(p) for p in config.images]
    pipe = load_pipeline(config.model, device=device)
    frame = tuple(config.resolution) if config.resolution else native_resolution(pipe)
    extractor = FeatureExtractor(pipe, config.layers, timesteps=config.timesteps, ensemble=config.ensemble,
                                 seed=config.seed, noise=config.noise, prompt=config.prompt, resolution=frame)
    x = to_tensor([resize_image(im, frame, config.resize) for im in images])
    with torch.no_grad():
        feats = extractor.extract(x, keys=[str(p) for p in config.images])
    names = list(feats)
    source = [feats[n][0:1].to(device) for n in names]
    target = [feats[n][1:2].to(device) for n in names]
    places = [placement((im.height, im.width), frame, config.resize) for im in images]
    size = (images[0].height, images[0].width)
    points = parse_points(config.points) if config.points else grid_points(size, config.grid)
    notes = []
    inside = P.in_image(points, size)
    uv = P.image_to_frame(points, places[0])
    seen = inside & P.in_frame(uv)
    if (~seen).any():
        notes.append(f"{int((~seen).sum())} point(s) outside the source image or the extraction frame: not matched")
    points, uv = points[seen], uv[seen]
    if not len(points):
        raise UserError(f"{config.images[0]}: none of the points lies inside the image and the extraction frame")
    u, v = P.image_lattice(places[1])
    covered = torch.from_numpy(((v >= 0) & (v <= 1))[:, None] & ((u >= 0) & (u <= 1))[None, :])
    lattice = (torch.from_numpy(u).float().to(device), torch.from_numpy(v).float().to(device))
    with torch.no_grad():
        pos, score = match_points(source, target, torch.from_numpy(uv).float()[None].to(device), lattice,
                                  soft_argmax=config.soft_argmax, temperature=config.temperature,
                                  valid=covered.to(device))
    matched = pos[0].cpu().numpy().astype(np.float64)
    title = f"{config.model} · {', '.join(names)} · {len(points)} points"
    save_pictures([MatchPicture(images[0], images[1], points, matched, None, None, title)], out, columns=1)
    return {"out": str(out), "points": points.tolist(), "matched": matched.tolist(),
            "cosine": score[0].cpu().numpy().tolist(), "layers": names, "notes": notes}
