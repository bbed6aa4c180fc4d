"""The data pipeline's default camera, in the conventions of the model's action inputs (model/action.py):
camera-to-world 4x4 in OpenCV axes (x right, y down, z forward); intrinsics `[fx, fy, cx, cy]` in pixels,
pixel (u, v) centred at (u + 0.5, v + 0.5), so cx = width / 2 is the image centre.
"""

from __future__ import annotations

import math

import numpy as np


def default_intrinsics(height: int, width: int, hfov_deg: float = 90.0) -> np.ndarray:
    """Square pixels, principal point at the image centre, `hfov_deg` horizontal field of view."""
    f = width / (2.0 * math.tan(math.radians(hfov_deg) / 2.0))
    return np.array([f, f, width / 2.0, height / 2.0], dtype=np.float64)
