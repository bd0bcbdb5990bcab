"""The environment check_minari.py records: CartPole-v1 whose observation is its rgb_array render.

Module-level wrappers that record their constructor arguments, so Minari stores an env spec it can
rebuild (`MinariDataset.recover_environment`).
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
from gymnasium.utils import RecordConstructorArgs
from gymnasium.wrappers import AddRenderObservation


class Downsample(gym.ObservationWrapper, RecordConstructorArgs):
    """Every stride-th pixel of the render: keeps the frames small without OpenCV."""

    def __init__(self, env: gym.Env, stride: int = 4):
        RecordConstructorArgs.__init__(self, stride=stride)
        gym.ObservationWrapper.__init__(self, env)
        self.stride = stride
        h, w, c = env.observation_space.shape
        shape = (len(range(0, h, stride)), len(range(0, w, stride)), c)
        self.observation_space = gym.spaces.Box(0, 255, shape, np.uint8)

    def observation(self, observation):
        return np.ascontiguousarray(observation[:: self.stride, :: self.stride])


class CartInfo(gym.Wrapper, RecordConstructorArgs):
    """Puts the cart position in every info (reset's and steps'), so Minari records an info key."""

    def __init__(self, env: gym.Env):
        RecordConstructorArgs.__init__(self)
        gym.Wrapper.__init__(self, env)

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        return obs, {**info, "cart_x": np.float64(self.env.unwrapped.state[0])}

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        return obs, reward, terminated, truncated, {**info, "cart_x": np.float64(self.env.unwrapped.state[0])}


def make_env(max_steps: int = 30, stride: int = 4) -> gym.Env:
    env = CartInfo(gym.make("CartPole-v1", render_mode="rgb_array", max_episode_steps=max_steps))
    return Downsample(AddRenderObservation(env, render_only=True), stride=stride)
