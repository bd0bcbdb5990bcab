"""A procedural 2D world of coloured shapes, and true captions about it.

The sample model is trained on these scenes and the sample reach task is rendered with them,
so a reward computed on the reach frames is one the model can actually understand. Every
caption is derived from the rendered geometry (never assumed), so training pairs are truthful.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (50, 80, 225),
    "yellow": (235, 205, 40),
}
SHAPES = ("ball", "square", "triangle")
CANVAS = 84  # pixels; the reach frames are 84x84 like the usual robot-learning cameras

# Centre distances (pixels) that define the distance relations. The gaps between the bands
# carry no distance caption, so no caption is ever borderline.
ON_MAX = 10.0
NEAR_MIN, NEAR_MAX = 14.0, 28.0
FAR_MIN = 38.0
DIRECTION_MIN = 12.0  # |dx| or |dy| beyond which left/right/above/below is said
DIRECTION_DOMINANCE = 1.5  # the named axis must dominate the other by this factor

DISTANCE_RELATIONS = ("on", "near", "far from")
DIRECTION_RELATIONS = ("left of", "right of", "above", "below")


@dataclass(frozen=True)
class SceneObject:
    colour: str
    shape: str
    x: float
    y: float
    radius: float

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    """Objects are drawn in order, so a later object lies on top of an earlier one."""

    objects: tuple[SceneObject, ...]
    background: tuple[int, int, int]
    texture: str = "plain"  # plain | noise | stripes
    texture_seed: int = 0


def render(scene: Scene, size: int = CANVAS) -> np.ndarray:
    """The scene as an (size, size, 3) uint8 RGB frame; identical input gives identical pixels."""
    image = Image.fromarray(_background(scene, size))
    draw = ImageDraw.Draw(image)
    scale = size / CANVAS
    for obj in scene.objects:
        x, y, r = obj.x * scale, obj.y * scale, obj.radius * scale
        fill = COLOURS[obj.colour]
        if obj.shape == "ball":
            draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)
        elif obj.shape == "square":
            draw.rectangle([x - r, y - r, x + r, y + r], fill=fill)
        else:
            draw.polygon([(x, y - r), (x + r, y + r * 0.8), (x - r, y + r * 0.8)], fill=fill)
    return np.asarray(image, dtype=np.uint8)


def _background(scene: Scene, size: int) -> np.ndarray:
    base = np.empty((size, size, 3), np.float32)
    base[:] = scene.background
    if scene.texture == "noise":
        rng = np.random.default_rng(scene.texture_seed)
        base += rng.normal(0.0, 10.0, (size, size, 1))
    elif scene.texture == "stripes":
        period = 6 + scene.texture_seed % 6
        stripes = ((np.arange(size) // period) % 2).astype(np.float32) * 18.0 - 9.0
        base += stripes[:, None, None] if scene.texture_seed % 2 else stripes[None, :, None]
    return np.clip(base, 0, 255).astype(np.uint8)


def distance(a: SceneObject, b: SceneObject) -> float:
    return float(np.hypot(a.x - b.x, a.y - b.y))


def relations(a: SceneObject, b: SceneObject) -> list[str]:
    """Every relation that holds from ``a`` to ``b`` by the thresholds above (image y grows downwards)."""
    found = []
    d = distance(a, b)
    if d < ON_MAX:
        found.append("on")
    elif NEAR_MIN <= d < NEAR_MAX:
        found.append("near")
    elif d >= FAR_MIN:
        found.append("far from")
    dx, dy = a.x - b.x, a.y - b.y
    if abs(dx) >= DIRECTION_MIN and abs(dx) >= DIRECTION_DOMINANCE * abs(dy):
        found.append("left of" if dx < 0 else "right of")
    if abs(dy) >= DIRECTION_MIN and abs(dy) >= DIRECTION_DOMINANCE * abs(dx):
        found.append("above" if dy < 0 else "below")
    return found


def relation_caption(a: SceneObject, relation: str, b: SceneObject) -> str:
    return f"the {a.name} is {relation} the {b.name}"


def presence_caption(objects: tuple[SceneObject, ...]) -> str:
    names = [f"a {o.name}" for o in objects]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def random_background(rng: np.random.Generator, textured: bool = True) -> dict:
    """Grey-ish backgrounds that never look like one of the object colours."""
    grey = float(rng.uniform(70, 200))
    tint = rng.uniform(-12, 12, 3)
    background = tuple(int(v) for v in np.clip(grey + tint, 0, 255))
    texture = str(rng.choice(["plain", "noise", "stripes"], p=[0.5, 0.25, 0.25])) if textured else "plain"
    return {"background": background, "texture": texture, "texture_seed": int(rng.integers(1 << 30))}


def random_identities(rng: np.random.Generator, count: int) -> list[tuple[str, str]]:
    """``count`` distinct (colour, shape) pairs."""
    every = [(c, s) for c in COLOURS for s in SHAPES]
    picks = rng.choice(len(every), size=count, replace=False)
    return [every[i] for i in picks]


def place_relation(
    rng: np.random.Generator, relation: str, anchor: SceneObject, radius: float, margin: float
) -> tuple[float, float] | None:
    """A position for an object of ``radius`` standing in ``relation`` to ``anchor``, or None if it does not fit."""
    if relation == "on":
        d, angle = rng.uniform(0, ON_MAX - 1), rng.uniform(0, 2 * np.pi)
    elif relation == "near":
        d, angle = rng.uniform(NEAR_MIN + 1, NEAR_MAX - 1), rng.uniform(0, 2 * np.pi)
    elif relation == "far from":
        d, angle = rng.uniform(FAR_MIN + 1, CANVAS), rng.uniform(0, 2 * np.pi)
    else:
        centre = {"right of": 0.0, "below": 0.5 * np.pi, "left of": np.pi, "above": 1.5 * np.pi}[relation]
        d, angle = rng.uniform(DIRECTION_MIN + 4, CANVAS * 0.8), centre + rng.uniform(-0.45, 0.45)
    x, y = anchor.x + d * np.cos(angle), anchor.y + d * np.sin(angle)
    low, high = margin + radius, CANVAS - margin - radius
    if not (low <= x <= high and low <= y <= high):
        return None
    return float(x), float(y)


def free_position(
    rng: np.random.Generator,
    radius: float,
    others: list[SceneObject],
    margin: float = 2.0,
    gap: float = 3.0,
    tries: int = 200,
) -> tuple[float, float] | None:
    """A uniformly random position that overlaps none of ``others``."""
    low, high = margin + radius, CANVAS - margin - radius
    for _ in range(tries):
        x, y = rng.uniform(low, high, 2)
        if all(np.hypot(x - o.x, y - o.y) >= radius + o.radius + gap for o in others):
            return float(x), float(y)
    return None


def sample_pair_scene(
    rng: np.random.Generator, identities: list[tuple[str, str]], relation: str, background: dict, radii: list[float]
) -> Scene | None:
    """A scene whose first object stands in ``relation`` to its second; the rest are distractors apart."""
    (ca, sa), (cb, sb) = identities[0], identities[1]
    pos = free_position(rng, radii[1], [])
    if pos is None:
        return None
    anchor = SceneObject(cb, sb, *pos, radii[1])
    target = place_relation(rng, relation, anchor, radii[0], margin=2.0)
    if target is None:
        return None
    mover = SceneObject(ca, sa, *target, radii[0])
    if relation != "on" and distance(mover, anchor) < mover.radius + anchor.radius + 2:
        return None
    placed = [anchor, mover]
    for (colour, shape), radius in zip(identities[2:], radii[2:], strict=True):
        pos = free_position(rng, radius, placed)
        if pos is None:
            return None
        placed.insert(0, SceneObject(colour, shape, *pos, radius))  # distractors underneath the pair
    return Scene(objects=tuple(placed), **background)


def scene_with(scene: Scene, index: int, **changes) -> Scene:
    """A copy of ``scene`` with one object changed (used to move the reach agent)."""
    objects = list(scene.objects)
    objects[index] = replace(objects[index], **changes)
    return replace(scene, objects=tuple(objects))
