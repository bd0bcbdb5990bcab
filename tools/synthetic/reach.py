"""The synthetic "reach" task: a red ball moves towards a green square, written as a robomimic-style HDF5 file.

Each episode is scripted: in most the agent heads for the square (with noisy steering) and stays on
it; in the others it wanders between random waypoints. The file stores the ground truth that a
learned reward should track: ``rewards`` is the negative distance between agent and target after
the step, ``success`` says whether the agent is then on the target.

Layout (robomimic): ``data/demo_K/obs/agentview_image`` (T, 84, 84, 3) uint8,
``next_obs/agentview_image``, ``obs/agent_pos``, ``obs/target_pos``, ``actions`` (T, 2),
``rewards``, ``dones``, ``success``. Regenerate the shipped file with::

    python -m tools.synthetic.reach --out sample_data/reach.h5
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from tools.synthetic import scenes

GOAL = "the red ball is on the green square"
AGENT = ("red", "ball", 6.5)
TARGET = ("green", "square", 8.0)
SUCCESS_RADIUS = 5.0  # pixels between centres: the ball sits on the square
START_MIN_DISTANCE = 40.0


@dataclass
class Episode:
    frames: np.ndarray  # (T + 1, 84, 84, 3) uint8: observations before and after every step
    positions: np.ndarray  # (T + 1, 2) agent centre per frame
    target: np.ndarray  # (2,)
    actions: np.ndarray  # (T, 2)

    @property
    def distances(self) -> np.ndarray:
        return np.hypot(*(self.positions - self.target).T)


Body = tuple[str, str, float]  # colour, shape, radius


def _initial_scene(
    rng: np.random.Generator, agent_body: Body = AGENT, target_body: Body = TARGET, textured: bool = False
) -> scenes.Scene:
    while True:
        target_xy = scenes.free_position(rng, target_body[2] + 4, [])
        target = scenes.SceneObject(target_body[0], target_body[1], *target_xy, target_body[2])
        others = [o for o in (scenes.random_identities(rng, 4)) if o not in {agent_body[:2], target_body[:2]}]
        placed = [target]
        for colour, shape in others[: int(rng.integers(1, 3))]:
            xy = scenes.free_position(rng, 7.0, placed, gap=6.0)
            if xy is not None:
                placed.append(scenes.SceneObject(colour, shape, *xy, 7.0))
        start = scenes.free_position(rng, agent_body[2], placed, gap=4.0)
        if start is not None and np.hypot(start[0] - target.x, start[1] - target.y) >= START_MIN_DISTANCE:
            agent = scenes.SceneObject(agent_body[0], agent_body[1], *start, agent_body[2])
            # Distractors first, then the target, the agent last: it is drawn on top of the square.
            return scenes.Scene(objects=(*placed[1:], target, agent), **scenes.random_background(rng, textured))


def _script(rng: np.random.Generator, start: np.ndarray, target: np.ndarray, steps: int, reaches: bool) -> np.ndarray:
    """Agent actions (steps, 2) in pixels: noisy steering to the target, or wandering between waypoints."""
    low, high = 2 + AGENT[2], scenes.CANVAS - 2 - AGENT[2]
    speed = rng.uniform(1.5, 2.8)
    position = start.astype(np.float64)
    waypoint = rng.uniform(low, high, 2)
    actions = np.zeros((steps, 2))
    for t in range(steps):
        goal = target if reaches else waypoint
        offset = goal - position
        gap = np.hypot(*offset)
        if not reaches and gap < 4:
            waypoint = rng.uniform(low, high, 2)
        heading = np.arctan2(offset[1], offset[0]) + rng.normal(0, 0.5)
        step = min(speed, gap) * np.array([np.cos(heading), np.sin(heading)]) + rng.normal(0, 0.3, 2)
        actions[t] = np.clip(position + step, low, high) - position
        position = position + actions[t]
    return actions


@dataclass(frozen=True)
class Plan:
    """An episode before rendering: the first scene (the agent is its last object) and the agent's path."""

    scene: scenes.Scene
    positions: np.ndarray  # (T + 1, 2) float64 agent centre per frame
    actions: np.ndarray  # (T, 2)

    def scene_at(self, index: int) -> scenes.Scene:
        x, y = self.positions[index]
        return scenes.scene_with(self.scene, len(self.scene.objects) - 1, x=float(x), y=float(y))


def plan_episode(
    rng: np.random.Generator, reaches: bool, agent: Body = AGENT, target: Body = TARGET, textured: bool = False
) -> Plan:
    """One scripted episode; the defaults are the shipped task (red ball, green square, plain background)."""
    scene = _initial_scene(rng, agent, target, textured)
    mover, square = scene.objects[-1], scene.objects[-2]
    steps = int(rng.integers(30, 61))
    start, goal = np.array([mover.x, mover.y]), np.array([square.x, square.y])
    actions = _script(rng, start, goal, steps, reaches)
    return Plan(scene, np.concatenate([start[None], start + np.cumsum(actions, axis=0)]), actions)


def make_episode(rng: np.random.Generator, reaches: bool) -> Episode:
    plan = plan_episode(rng, reaches)
    frames = np.stack([scenes.render(plan.scene_at(i)) for i in range(len(plan.positions))])
    target = plan.scene.objects[-2]
    return Episode(
        frames,
        plan.positions.astype(np.float32),
        np.array([target.x, target.y], np.float32),
        plan.actions.astype(np.float32),
    )


def write_dataset(path: str | Path, episodes: int = 40, seed: int = 0, reach_fraction: float = 0.65) -> Path:
    """Write the reach dataset; ``rewards[t]`` and ``success[t]`` describe the state after step t."""
    rng = np.random.default_rng(seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        total = 0
        for k in range(episodes):
            episode = make_episode(rng, reaches=bool(rng.random() < reach_fraction))
            steps = len(episode.actions)
            after = episode.distances[1:]
            demo = data.create_group(f"demo_{k}")
            frames = {"compression": "gzip", "compression_opts": 6, "chunks": (min(16, steps), 84, 84, 3)}
            demo.create_dataset("obs/agentview_image", data=episode.frames[:-1], **frames)
            demo.create_dataset("next_obs/agentview_image", data=episode.frames[1:], **frames)
            demo.create_dataset("obs/agent_pos", data=episode.positions[:-1])
            demo.create_dataset("next_obs/agent_pos", data=episode.positions[1:])
            demo.create_dataset("obs/target_pos", data=np.repeat(episode.target[None], steps, axis=0))
            demo.create_dataset("next_obs/target_pos", data=np.repeat(episode.target[None], steps, axis=0))
            demo.create_dataset("actions", data=episode.actions)
            demo.create_dataset("rewards", data=(-after / scenes.CANVAS).astype(np.float32))
            demo.create_dataset("success", data=after < SUCCESS_RADIUS)
            demo.create_dataset("dones", data=np.arange(steps) == steps - 1)
            demo.attrs["num_samples"] = steps
            total += steps
        data.attrs["total"] = total
        data.attrs["env_args"] = json.dumps(
            {
                "env_name": "vlmlabel-synthetic-reach",
                "goal": GOAL,
                "seed": seed,
                "reward": "minus the agent-target centre distance after the step, in frame widths",
                "success": f"agent centre within {SUCCESS_RADIUS} px of the target centre after the step",
            }
        )
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the synthetic reach dataset (robomimic layout).")
    parser.add_argument("--out", type=Path, required=True, help="HDF5 file to write.")
    parser.add_argument("--episodes", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = write_dataset(args.out, args.episodes, args.seed)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
