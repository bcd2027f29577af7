#!/usr/bin/env python3
"""Background fidelity of a grid written by `diffusiond eval --grid` (or
`diffusiond dataset --preview`): per tile, the median colour of its border
pixels and its RGB distance to the nearest colour of the dataset's palette
(src/train/scene.rs). Renders score 0; a model that draws muddy, desaturated
backgrounds scores far from it. Needs numpy and Pillow (the reference venv).

    .venv-fixtures/bin/python scripts/background_fidelity.py GRID.png TILE_SIDE COUNT
"""
import sys, numpy as np
from PIL import Image
# Colour::rgb in src/train/scene.rs, in the order of Colour::ALL.
PAL = np.array([[220,30,35],[35,165,60],[35,75,220],[250,220,40],[250,130,15],[130,50,180],[245,245,245],[15,15,15],[128,128,128]], float)
path, tile, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
im = np.asarray(Image.open(path).convert("RGB")).astype(float)
cols = (im.shape[1] - 2) // (tile + 2)
d = []
for k in range(n):
    r, c = divmod(k, cols)
    y, x = 2 + r * (tile + 2), 2 + c * (tile + 2)
    t = im[y:y + tile, x:x + tile]
    border = np.concatenate([t[0], t[-1], t[:, 0], t[:, -1]])
    med = np.median(border, axis=0)
    d.append(np.sqrt(((PAL - med) ** 2).sum(1)).min())
d = np.array(d)
print(f"{path}: {n} tiles, background distance to the palette: median {np.median(d):.1f}, mean {d.mean():.1f}, within 30: {(d < 30).mean()*100:.0f}%")
