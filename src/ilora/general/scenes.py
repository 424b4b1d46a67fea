"""Procedurally drawn scenes and the question families asked about them.

A scene is a few simple shapes (circle / square / triangle in a handful of colours) on a
plain background, each in its own cell of a ``GRID x GRID`` grid with a little jitter. The
answer to every question is a function of the *coarse* scene (shape, colour, cell of each
object) and the prompt, which is also what the train/test split hashes: two rows that
differ only in jitter are the same question and always land in the same split.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 50, 50),
    "green": (50, 180, 70),
    "blue": (60, 100, 235),
    "yellow": (235, 205, 50),
    "purple": (160, 80, 210),
}
BACKGROUND = (24, 24, 24)
GRID = 4
QUADRANTS: tuple[str, ...] = ("top-left", "top-right", "bottom-left", "bottom-right")
MIN_SIZE, MAX_SIZE = 0.55, 0.85  # shape side as a fraction of the cell side


@dataclass(frozen=True)
class SceneObject:
    """One shape: what it is, which grid cell it sits in, and how it is drawn inside the cell.

    ``size`` is the side as a fraction of the cell; ``dx`` / ``dy`` shift the centre by a
    fraction of the cell, small enough that the shape never leaves its cell.
    """

    shape: str
    color: str
    row: int
    col: int
    size: float = 0.7
    dx: float = 0.0
    dy: float = 0.0

    @property
    def coarse(self) -> tuple[str, str, int, int]:
        """What the questions can depend on: shape, colour and cell (no drawing jitter)."""
        return (self.shape, self.color, self.row, self.col)

    @property
    def quadrant(self) -> str:
        half = GRID // 2
        return QUADRANTS[2 * (self.row >= half) + (self.col >= half)]

    @property
    def name(self) -> str:
        """Its referring expression, e.g. ``"red circle"``."""
        return f"{self.color} {self.shape}"


@dataclass(frozen=True)
class Scene:
    """A set of objects, at most one per grid cell."""

    objects: tuple[SceneObject, ...]

    @property
    def coarse(self) -> tuple[tuple[str, str, int, int], ...]:
        return tuple(sorted(o.coarse for o in self.objects))

    def count(self, shape: str | None = None, color: str | None = None) -> int:
        """How many objects match ``shape`` and ``color`` (``None`` matches anything)."""
        return sum(
            (shape is None or o.shape == shape) and (color is None or o.color == color) for o in self.objects
        )

    def unique_objects(self) -> list[SceneObject]:
        """Objects whose colour+shape name picks out exactly one object."""
        return [o for o in self.objects if self.count(o.shape, o.color) == 1]

    def free_cells(self) -> list[tuple[int, int]]:
        taken = {(o.row, o.col) for o in self.objects}
        return [(r, c) for r in range(GRID) for c in range(GRID) if (r, c) not in taken]

    def render(self, image_size: int) -> Image.Image:
        """Draw the scene as an ``image_size`` x ``image_size`` RGB image."""
        image = Image.new("RGB", (image_size, image_size), BACKGROUND)
        draw = ImageDraw.Draw(image)
        cell = image_size / GRID
        for o in self.objects:
            cx = (o.col + 0.5 + o.dx) * cell
            cy = (o.row + 0.5 + o.dy) * cell
            h = o.size * cell / 2
            fill = COLORS[o.color]
            if o.shape == "circle":
                draw.ellipse((cx - h, cy - h, cx + h, cy + h), fill=fill)
            elif o.shape == "square":
                draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
            else:  # triangle, apex up
                draw.polygon([(cx, cy - h), (cx + h, cy + h), (cx - h, cy + h)], fill=fill)
        return image


def random_object(rng: np.random.Generator, row: int, col: int) -> SceneObject:
    """A random shape and colour drawn in cell (row, col) with random size and jitter."""
    size = float(rng.uniform(MIN_SIZE, MAX_SIZE))
    slack = (1.0 - size) / 2  # how far the centre may move and keep the shape inside the cell
    return SceneObject(
        shape=SHAPES[rng.integers(len(SHAPES))],
        color=list(COLORS)[rng.integers(len(COLORS))],
        row=row,
        col=col,
        size=size,
        dx=float(rng.uniform(-slack, slack)),
        dy=float(rng.uniform(-slack, slack)),
    )


def random_scene(rng: np.random.Generator, max_objects: int, min_objects: int = 1) -> Scene:
    """Between ``min_objects`` and ``max_objects`` random objects in distinct cells."""
    k = int(rng.integers(min_objects, max_objects + 1))
    cells = rng.choice(GRID * GRID, size=k, replace=False)
    return Scene(tuple(random_object(rng, int(c) // GRID, int(c) % GRID) for c in cells))


def perturb_scene(rng: np.random.Generator, scene: Scene) -> Scene:
    """The scene with one object changed in colour, shape or cell (always coarsely different)."""
    objects = list(scene.objects)
    i = int(rng.integers(len(objects)))
    target = objects[i]
    change = ("color", "shape", "cell")[rng.integers(3 if scene.free_cells() else 2)]
    if change == "color":
        options = [c for c in COLORS if c != target.color]
        objects[i] = dataclasses.replace(target, color=options[rng.integers(len(options))])
    elif change == "shape":
        options = [s for s in SHAPES if s != target.shape]
        objects[i] = dataclasses.replace(target, shape=options[rng.integers(len(options))])
    else:
        free = scene.free_cells()
        row, col = free[rng.integers(len(free))]
        objects[i] = dataclasses.replace(target, row=row, col=col)
    return Scene(tuple(objects))


def plural(noun: str) -> str:
    return noun + "s"


@dataclass(frozen=True)
class SceneQuestion:
    """A question about one or two scenes, with its answer derived from the scene specs."""

    scenes: tuple[Scene, ...]
    prompt: str
    answer: str


# name -> question maker; a maker returns None when the drawn scene cannot carry its question
SceneFamily = Callable[[np.random.Generator, int], "SceneQuestion | None"]
SCENE_FAMILIES: dict[str, SceneFamily] = {}


def register_scene_family(name: str) -> Callable[[SceneFamily], SceneFamily]:
    def add(fn: SceneFamily) -> SceneFamily:
        SCENE_FAMILIES[name] = fn
        return fn

    return add


@register_scene_family("count")
def count_question(rng: np.random.Generator, max_objects: int) -> SceneQuestion:
    """How many objects of a colour, a shape, both, or in total.

    The count is drawn first (uniform over 0..max_objects; 1.. for all objects) and the
    scene built around it, so that no answer dominates.
    """
    mode = int(rng.integers(4))  # 0: colour+shape, 1: shape, 2: colour, 3: all objects
    shape = SHAPES[rng.integers(len(SHAPES))] if mode in (0, 1) else None
    color = list(COLORS)[rng.integers(len(COLORS))] if mode in (0, 2) else None
    target = int(rng.integers(1 if mode == 3 else 0, max_objects + 1))
    max_others = 0 if mode == 3 else max_objects - target
    others = int(rng.integers(1 if target == 0 else 0, max_others + 1))
    cells = rng.choice(GRID * GRID, size=target + others, replace=False)
    objects = []
    for i, cell in enumerate(cells):
        obj = random_object(rng, int(cell) // GRID, int(cell) % GRID)
        if i < target:
            obj = dataclasses.replace(obj, shape=shape or obj.shape, color=color or obj.color)
        else:
            while (shape is None or obj.shape == shape) and (color is None or obj.color == color):
                obj = random_object(rng, obj.row, obj.col)
        objects.append(obj)
    scene = Scene(tuple(objects))
    noun = f"{color} " * (color is not None) + (plural(shape) if shape else "objects")
    return SceneQuestion((scene,), f"How many {noun} are there?", str(scene.count(shape, color)))


@register_scene_family("color")
def color_question(rng: np.random.Generator, max_objects: int) -> SceneQuestion | None:
    """The colour of the only object of some shape."""
    scene = random_scene(rng, max_objects)
    shapes = [s for s in SHAPES if scene.count(shape=s) == 1]
    if not shapes:
        return None
    shape = shapes[rng.integers(len(shapes))]
    (target,) = [o for o in scene.objects if o.shape == shape]
    return SceneQuestion((scene,), f"What color is the {shape}?", target.color)


@register_scene_family("shape")
def shape_question(rng: np.random.Generator, max_objects: int) -> SceneQuestion | None:
    """The shape of the only object of some colour."""
    scene = random_scene(rng, max_objects)
    colors = [c for c in COLORS if scene.count(color=c) == 1]
    if not colors:
        return None
    color = colors[rng.integers(len(colors))]
    (target,) = [o for o in scene.objects if o.color == color]
    return SceneQuestion((scene,), f"What shape is the {color} object?", target.shape)


@register_scene_family("position")
def position_question(rng: np.random.Generator, max_objects: int) -> SceneQuestion | None:
    """Where an object is (quadrant), or whether one is left/right of or above/below another."""
    mode = int(rng.integers(3))
    scene = random_scene(rng, max_objects, min_objects=1 if mode == 0 else 2)
    unique = scene.unique_objects()
    if mode == 0:
        if not unique:
            return None
        target = unique[rng.integers(len(unique))]
        return SceneQuestion((scene,), f"Where is the {target.name}?", target.quadrant)
    axis = "col" if mode == 1 else "row"
    pairs = [(a, b) for a in unique for b in unique if getattr(a, axis) != getattr(b, axis)]
    if not pairs:
        return None
    a, b = pairs[rng.integers(len(pairs))]
    if mode == 1:
        answer = "left" if a.col < b.col else "right"
        return SceneQuestion((scene,), f"Is the {a.name} left or right of the {b.name}?", answer)
    answer = "above" if a.row < b.row else "below"
    return SceneQuestion((scene,), f"Is the {a.name} above or below the {b.name}?", answer)


@register_scene_family("compare")
def compare_question(rng: np.random.Generator, max_objects: int) -> SceneQuestion | None:
    """Two images: which has more of something, or whether they are the same."""
    first = random_scene(rng, max_objects)
    if rng.random() < 0.5:
        second = first if rng.random() < 0.5 else perturb_scene(rng, first)
        answer = "yes" if second == first else "no"
        return SceneQuestion((first, second), "Are the two images the same?", answer)
    second = random_scene(rng, max_objects)
    mode = int(rng.integers(3))
    if mode == 0:
        shape = SHAPES[rng.integers(len(SHAPES))]
        noun, counts = plural(shape), (first.count(shape=shape), second.count(shape=shape))
    elif mode == 1:
        color = list(COLORS)[rng.integers(len(COLORS))]
        noun, counts = f"{color} objects", (first.count(color=color), second.count(color=color))
    else:
        noun, counts = "objects", (first.count(), second.count())
    if counts[0] == counts[1]:
        return None
    answer = "first" if counts[0] > counts[1] else "second"
    return SceneQuestion((first, second), f"Which image has more {noun}, the first or the second?", answer)


def scene_prompt_vocabulary() -> list[str]:
    """Every prompt/answer text the scene families can produce, as representative strings.

    Kept next to the templates above so that a new template and its words are edited together.
    """
    texts = ["How many objects are there?", "Are the two images the same?", "yes", "no", "first", "second"]
    texts += [str(i) for i in range(GRID * GRID + 1)]  # counts, up to max_objects <= 16
    texts += list(QUADRANTS) + ["left", "right", "above", "below"]
    for shape in SHAPES:
        texts += [shape, f"What color is the {shape}?", f"How many {plural(shape)} are there?"]
        texts.append(f"Which image has more {plural(shape)}, the first or the second?")
    for color in COLORS:
        texts += [color, f"What shape is the {color} object?", f"How many {color} objects are there?"]
        texts.append(f"Which image has more {color} objects, the first or the second?")
        for shape in SHAPES:
            name = f"{color} {shape}"
            texts += [
                f"How many {color} {plural(shape)} are there?",
                f"Where is the {name}?",
                f"Is the {name} left or right of the {name}?",
                f"Is the {name} above or below the {name}?",
            ]
    texts.append("Which image has more objects, the first or the second?")
    return texts
