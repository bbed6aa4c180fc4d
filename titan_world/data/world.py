"""A procedural grid world: a maze-like town of textured blocks with named, coloured landmarks.

The world is 2.5-D (full-height wall blocks on a flat floor) so one raycaster renders it exactly
from any camera (see `render.py`). Everything is derived from one seed; texture atlases are
built from fixed seeds so a material always looks the same across episodes (which is what lets a
model learn "the golden gate" from captions).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from functools import cache

import numpy as np

TEX = 16  # texels per wall/floor texture side
WALL_HEIGHT = 1.2  # metres (eye at 0.5 m, jump apex < 0.9 m: rays above a wall top see sky)

MATERIALS = ["brick", "stone", "wooden", "hedge", "concrete"]
FLOORS = ["cobblestone", "grass", "wooden planks", "sand", "asphalt"]
SKIES = ["clear blue sky", "orange sunset sky", "grey overcast sky", "starry night sky"]
LANDMARKS = [
    "red-and-white striped pillar",
    "blue crystal block",
    "golden gate",
    "green ivy wall with pink flowers",
    "purple mural",
    "black-and-yellow warning wall",
]
# cell value: 0 free, 1..len(MATERIALS) a material, then the landmarks
LANDMARK_BASE = 1 + len(MATERIALS)
NUM_CELL_TYPES = LANDMARK_BASE + len(LANDMARKS)


def _noise(rng: np.random.Generator, amp: float, shape=(TEX, TEX)) -> np.ndarray:
    return 1.0 + amp * (rng.random(shape) - 0.5)


def _material_texture(kind: str, rng: np.random.Generator) -> np.ndarray:
    """[TEX, TEX, 3] floats in [0, 1]; vectorised patterns, no per-pixel loops."""
    v, u = np.mgrid[0:TEX, 0:TEX]
    base = {
        "brick": (0.62, 0.27, 0.20),
        "stone": (0.55, 0.55, 0.58),
        "wooden": (0.55, 0.38, 0.20),
        "hedge": (0.18, 0.45, 0.16),
        "concrete": (0.70, 0.68, 0.62),
    }[kind]
    t = np.ones((TEX, TEX, 3)) * np.array(base)
    if kind == "brick":
        mortar = (v % 4 == 0) | (((u + 4 * ((v // 4) % 2)) % 8) == 0)
        t = t * _noise(rng, 0.25)[..., None]
        t[mortar] = (0.78, 0.76, 0.70)
    elif kind == "stone":
        t = t * _noise(rng, 0.45)[..., None]
        t[(v % 8 == 0) | (((u + 5 * ((v // 8) % 2)) % 8) == 0)] *= 0.55
    elif kind == "wooden":
        t = t * (0.85 + 0.15 * np.sin(u * 1.7 + rng.random() * 3))[..., None] * _noise(rng, 0.15)[..., None]
        t[u % 4 == 0] *= 0.6
    elif kind == "hedge":
        t = t * _noise(rng, 0.8)[..., None]
    else:
        t = t * _noise(rng, 0.12)[..., None]
        t[v % 8 == 0] *= 0.8
    return np.clip(t, 0, 1)


def _landmark_texture(name: str, rng: np.random.Generator) -> np.ndarray:
    v, u = np.mgrid[0:TEX, 0:TEX]
    t = np.zeros((TEX, TEX, 3))
    if name.startswith("red-and-white"):
        t[:] = (0.95, 0.95, 0.95)
        t[((v + u) // 3) % 2 == 0] = (0.9, 0.05, 0.05)
    elif name.startswith("blue crystal"):
        t[:] = (0.1, 0.35, 0.95)
        t[(np.abs(u - 8) + np.abs(v - 8)) % 5 == 0] = (0.7, 0.95, 1.0)
    elif name.startswith("golden"):
        t[:] = (0.95, 0.75, 0.1)
        t[(u % 4 == 0) & (v > 3)] = (0.35, 0.25, 0.05)
        t[v < 3] = (1.0, 0.9, 0.4)
    elif name.startswith("green ivy"):
        t[:] = (0.1, 0.55, 0.1)
        t[rng.random((TEX, TEX)) < 0.18] = (1.0, 0.45, 0.75)
    elif name.startswith("purple"):
        t[:] = (0.5, 0.1, 0.6)
        t[((u - 8) ** 2 + (v - 8) ** 2) < 20] = (0.95, 0.85, 0.2)
    else:
        t[:] = (0.08, 0.08, 0.08)
        t[((u - v) // 3) % 2 == 0] = (1.0, 0.85, 0.0)
    return t


def _floor_texture(kind: str, rng: np.random.Generator) -> np.ndarray:
    v, u = np.mgrid[0:TEX, 0:TEX]
    base = {
        "cobblestone": (0.45, 0.43, 0.40),
        "grass": (0.25, 0.55, 0.20),
        "wooden planks": (0.60, 0.45, 0.28),
        "sand": (0.85, 0.75, 0.50),
        "asphalt": (0.25, 0.25, 0.27),
    }[kind]
    t = np.ones((TEX, TEX, 3)) * np.array(base) * _noise(rng, 0.35)[..., None]
    if kind == "cobblestone":
        t[(v % 4 == 0) | ((u + 2 * ((v // 4) % 2)) % 4 == 0)] *= 0.6
    elif kind == "wooden planks":
        t[v % 4 == 0] *= 0.55
    elif kind == "asphalt":
        t[(u == 0) & (v % 8 < 4)] = (0.9, 0.9, 0.85)
    # a darker tile border so the floor carries motion cues
    t[(u == 0) | (v == 0)] *= 0.85
    return np.clip(t, 0, 1)


SKY_W, SKY_H = 64, 32  # panorama over azimuth [-pi, pi) and elevation [-pi/2, pi/2]


def _sky_texture(kind: str, rng: np.random.Generator) -> np.ndarray:
    el = np.linspace(np.pi / 2, -np.pi / 2, SKY_H)[:, None] * np.ones((1, SKY_W))
    az = np.linspace(-np.pi, np.pi, SKY_W, endpoint=False)[None, :] * np.ones((SKY_H, 1))
    h = np.clip(el / (np.pi / 2), 0, 1)[..., None]
    top, horizon = {
        "clear blue sky": ((0.20, 0.45, 0.90), (0.70, 0.85, 1.00)),
        "orange sunset sky": ((0.25, 0.20, 0.50), (1.00, 0.55, 0.20)),
        "grey overcast sky": ((0.50, 0.52, 0.55), (0.75, 0.76, 0.78)),
        "starry night sky": ((0.01, 0.02, 0.08), (0.08, 0.10, 0.25)),
    }[kind]
    sky = np.array(horizon) * (1 - h) + np.array(top) * h
    if kind == "starry night sky":
        sky[rng.random((SKY_H, SKY_W)) < 0.05] = (1.0, 1.0, 0.9)
    elif kind != "grey overcast sky":
        clouds = np.sin(az * 3 + 1.3) * np.sin(el * 9) > 0.6
        sky[clouds & (el > 0.1)] = sky[clouds & (el > 0.1)] * 0.4 + 0.6
        sun = (np.abs(az - 0.8) < 0.12) & (np.abs(el - (0.15 if "sunset" in kind else 0.6)) < 0.12)
        sky[sun] = (1.0, 0.95, 0.7)
    return np.clip(sky, 0, 1)


@cache
def wall_atlas() -> np.ndarray:
    """[NUM_CELL_TYPES, TEX, TEX, 3] float32 texture of every cell type (index 0 unused)."""
    atlas = np.zeros((NUM_CELL_TYPES, TEX, TEX, 3), np.float32)
    for i, m in enumerate(MATERIALS):
        atlas[1 + i] = _material_texture(m, np.random.default_rng(100 + i))
    for i, name in enumerate(LANDMARKS):
        atlas[LANDMARK_BASE + i] = _landmark_texture(name, np.random.default_rng(200 + i))
    return atlas


@cache
def floor_texture(kind: str) -> np.ndarray:
    return _floor_texture(kind, np.random.default_rng(300 + FLOORS.index(kind))).astype(np.float32)


@cache
def sky_texture(kind: str) -> np.ndarray:
    return _sky_texture(kind, np.random.default_rng(400 + SKIES.index(kind))).astype(np.float32)


@dataclass
class Landmark:
    name: str
    cell: tuple[int, int]  # (row=z, col=x) of the landmark block
    approach: tuple[int, int]  # a free cell next to it


@dataclass
class World:
    """Grid `cells[z, x]` (0 free), its materials and landmarks, and how to describe it."""

    cells: np.ndarray
    material: str
    floor: str
    sky: str
    layout: str  # "maze", "town" or "courtyard" (the demo level)
    landmarks: list[Landmark] = field(default_factory=list)

    def is_free(self, row: int, col: int) -> bool:
        h, w = self.cells.shape
        return 0 <= row < h and 0 <= col < w and self.cells[row, col] == 0

    def free_cells(self) -> list[tuple[int, int]]:
        return [tuple(map(int, rc)) for rc in np.argwhere(self.cells == 0)]

    def shortest_path(self, start: tuple[int, int], goal: tuple[int, int]) -> list[tuple[int, int]]:
        """BFS over free cells (4-neighbourhood): the cells after `start` up to `goal`, [] if none."""
        prev = {start: start}
        queue = deque([start])
        while queue:
            cur = queue.popleft()
            if cur == goal:
                break
            for dr, dc in ((1, 0), (-1, 0), (0, 1), (0, -1)):
                nxt = (cur[0] + dr, cur[1] + dc)
                if nxt not in prev and self.is_free(*nxt):
                    prev[nxt] = cur
                    queue.append(nxt)
        if goal not in prev:
            return []
        path = [goal]
        while path[-1] != start:
            path.append(prev[path[-1]])
        return path[::-1][1:]

    def landmark_at(self, cell_type: int) -> str | None:
        i = cell_type - LANDMARK_BASE
        return LANDMARKS[i] if 0 <= i < len(LANDMARKS) else None

    def description(self) -> dict:
        return {
            "layout": self.layout,
            "material": self.material,
            "floor": self.floor,
            "sky": self.sky,
            "size": list(self.cells.shape),
            "landmarks": [{"name": l.name, "cell": list(l.cell)} for l in self.landmarks],
        }


def generate_world(rng: np.random.Generator, rooms: int = 6) -> World:
    """A (2*rooms+1)^2 maze carved by randomised DFS, then opened up (loops, plazas) by chance."""
    n = 2 * rooms + 1
    material_i = int(rng.integers(len(MATERIALS)))
    cells = np.full((n, n), 1 + material_i, np.int16)
    # a second material on some blocks for variety
    second = 1 + int(rng.integers(len(MATERIALS)))
    stack = [(1, 1)]
    cells[1, 1] = 0
    seen = {(1, 1)}
    while stack:
        r, c = stack[-1]
        nbrs = [
            (r + dr, c + dc)
            for dr, dc in ((2, 0), (-2, 0), (0, 2), (0, -2))
            if 0 < r + dr < n - 1 and 0 < c + dc < n - 1 and (r + dr, c + dc) not in seen
        ]
        if not nbrs:
            stack.pop()
            continue
        nr, nc = nbrs[int(rng.integers(len(nbrs)))]
        cells[(r + nr) // 2, (c + nc) // 2] = 0
        cells[nr, nc] = 0
        seen.add((nr, nc))
        stack.append((nr, nc))
    layout = "town" if rng.random() < 0.5 else "maze"
    inner = np.zeros_like(cells, bool)
    inner[1:-1, 1:-1] = True
    walls = np.argwhere((cells > 0) & inner)
    open_frac = 0.35 if layout == "town" else 0.12
    for r, c in walls[rng.random(len(walls)) < open_frac]:
        cells[r, c] = 0
    if layout == "town":  # a plaza
        r0, c0 = (int(x) for x in rng.integers(1, n - 4, size=2))
        cells[r0 : r0 + 3, c0 : c0 + 3] = 0
    blocks = np.argwhere((cells > 0) & inner)
    for r, c in blocks[rng.random(len(blocks)) < 0.25]:
        cells[r, c] = second
    world = World(
        cells=cells,
        material=MATERIALS[material_i],
        floor=FLOORS[int(rng.integers(len(FLOORS)))],
        sky=SKIES[int(rng.integers(len(SKIES)))],
        layout=layout,
    )
    # landmarks: wall blocks that touch a free cell
    candidates = [
        ((int(r), int(c)), (int(r + dr), int(c + dc)))
        for r, c in np.argwhere(cells > 0)
        for dr, dc in ((1, 0), (-1, 0), (0, 1), (0, -1))
        if world.is_free(int(r + dr), int(c + dc))
    ]
    names = rng.permutation(len(LANDMARKS))[: int(rng.integers(3, 5))]
    used: set[tuple[int, int]] = set()
    for li in names:
        for _ in range(50):
            cell, approach = candidates[int(rng.integers(len(candidates)))]
            if cell not in used and all(abs(cell[0] - u[0]) + abs(cell[1] - u[1]) > 3 for u in used):
                break
        used.add(cell)
        cells[cell] = LANDMARK_BASE + int(li)
        world.landmarks.append(Landmark(LANDMARKS[int(li)], cell, approach))
    return world


# The demo level's walls, one material per side (north = row 0, then east, south, west), each with
# a landmark at its middle: the side a view shows says which way the camera faces.
COURTYARD_SIDES = (
    ("brick", "red-and-white striped pillar"),
    ("hedge", "blue crystal block"),
    ("concrete", "golden gate"),
    ("stone", "purple mural"),
)


def courtyard(size: int = 9) -> World:
    """An open `size` x `size` courtyard (one ring of wall blocks) under a clear sky: the demo level.

    Open ground keeps most of a view in sight from one second to the next, and each side's own
    material and landmark make the rest predictable from the heading, so a small model can learn
    the whole level in minutes; a maze's corridors replace the view with unseen walls at every turn."""
    if size < 5:
        raise ValueError(f"courtyard size={size}: expected >= 5 (a ring of walls around open ground)")
    mat = {name: 1 + i for i, name in enumerate(MATERIALS)}
    cells = np.zeros((size, size), np.int16)
    mid, last = size // 2, size - 1
    sides = [  # (wall cells, landmark cell, its approach cell)
        (np.s_[0, :], (0, mid), (1, mid)),
        (np.s_[:, last], (mid, last), (mid, last - 1)),
        (np.s_[last, :], (last, mid), (last - 1, mid)),
        (np.s_[:, 0], (mid, 0), (mid, 1)),
    ]
    world = World(cells=cells, material="brick", floor="sand", sky="clear blue sky", layout="courtyard")
    for (material, landmark), (wall, cell, approach) in zip(COURTYARD_SIDES, sides):
        cells[wall] = mat[material]
        cells[cell] = LANDMARK_BASE + LANDMARKS.index(landmark)
        world.landmarks.append(Landmark(landmark, cell, approach))
    return world
