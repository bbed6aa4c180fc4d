"""Hierarchical captions from the scene description and the agent's events (LingBot report §2):
a narrative caption of the whole clip, a scene-static caption (what does not change), and dense
time-stamped captions of events, including when a landmark comes into view (from the renderer's
per-pixel cell ids, so "in view" is exact, not guessed).
"""

from __future__ import annotations

import numpy as np

from titan_world.data.agent import Event
from titan_world.data.world import LANDMARK_BASE, LANDMARKS, World

VISIBLE_FRACTION = 0.03  # share of the image a landmark must cover to count as "in view"


def _a(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def scene_caption(world: World) -> str:
    names = [_a(l.name) for l in world.landmarks]
    listed = ", ".join(names[:-1]) + f" and {names[-1]}" if len(names) > 1 else names[0]
    place = {"maze": "maze of", "courtyard": "walled courtyard of"}.get(world.layout, "small town of")
    return f"A {place} {world.material} blocks with {world.floor} underfoot under {_a(world.sky)}. Landmarks: {listed}."


def _event_text(e: Event, world: World) -> str:
    d = e.detail
    if e.kind == "walk":
        return f"walks toward the {d['target']}"
    if e.kind == "run":
        return f"runs toward the {d['target']}"
    if e.kind == "revisit":
        return f"returns to the {d['target']} seen earlier"
    if e.kind == "turn":
        return f"turns {d['direction']}"
    if e.kind == "look":
        text = f"looks around, first to the {d['first']}"
        if d.get("vertical") == "up":
            text += f", then up at the {world.sky}"
        elif d.get("vertical") == "down":
            text += f", then down at the {world.floor}"
        return text
    if e.kind == "stop":
        return "stops and stands still"
    if e.kind == "jump":
        return "jumps"
    if e.kind == "strafe":
        return f"steps to the {d['direction']}"
    return e.kind


def visibility_events(ids: np.ndarray) -> list[tuple[int, str]]:
    """(frame, landmark) each time a landmark's share of the image rises above VISIBLE_FRACTION."""
    t, h, w = ids.shape
    out = []
    for i, name in enumerate(LANDMARKS):
        share = (ids == LANDMARK_BASE + i).reshape(t, -1).mean(axis=1)
        vis = share >= VISIBLE_FRACTION
        rises = np.flatnonzero(vis & ~np.concatenate([[False], vis[:-1]]))
        out += [(int(f), name) for f in rises]
    return sorted(out)


def build_captions(world: World, events: list[Event], ids: np.ndarray, fps: float) -> dict:
    """{'narrative', 'scene', 'events': [{'start_s', 'end_s', 'start_frame', 'end_frame', 'text'}]}."""
    dense = [
        {"start_frame": e.start, "end_frame": e.end, "text": f"The camera {_event_text(e, world)}."} for e in events
    ]
    dense += [
        {"start_frame": f, "end_frame": f + 1, "text": f"The {name} comes into view."}
        for f, name in visibility_events(ids)
    ]
    dense.sort(key=lambda d: (d["start_frame"], d["end_frame"]))
    for d in dense:
        d["start_s"] = round(d["start_frame"] / fps, 3)
        d["end_s"] = round(d["end_frame"] / fps, 3)
    steps = [_event_text(e, world) for e in events]
    story = ", then ".join(steps[:6]) if steps else "stands still"
    where = world.layout if world.layout in ("maze", "courtyard") else "town"
    narrative = f"A first-person walk through a {world.material} {where} under {_a(world.sky)}: the camera {story}."
    return {"narrative": narrative, "scene": scene_caption(world), "events": dense}
