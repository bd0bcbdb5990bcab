"""Gymnasium wrappers: a CLIP reward R(render(), goal) for online RL, from the same scoring path as ``relabel``.

``VLMReward`` wraps one ``Env`` and ``VLMRewardVector`` a ``VectorEnv`` (all sub-environments scored in one
forward pass). Both need ``render_mode="rgb_array"``: the reward of a step is the score of the frame the env
renders after it. ``mode`` says what the agent gets: ``"replace"`` (the VLM reward), ``"add"`` (env + VLM) or
``"info"`` (the env's own reward); the env's reward is always in ``info["env_reward"]`` and the VLM reward in
``info["vlm_reward"]``.

Autoreset (Gymnasium 1.x, ``AutoresetMode.NEXT_STEP``, the default of vector envs and of the ``Autoreset``
wrapper): the step after a terminated or truncated one only resets the env; it returns the new episode's first
observation with reward 0, and no action led to its frame. That step is **not scored**: its reward is the env's
(0.0) in every mode and its VLM reward is 0.0 (vector envs: ``info["_vlm_reward"]`` is False for it). Vector
envs in ``SAME_STEP`` mode are refused: the terminal frame is gone (the sub-env already reset) when the wrapper
could render it. ``DISABLED`` mode scores every step.

Requires gymnasium: ``pip install "vlmlabel[gym]"``.
"""

from __future__ import annotations

from typing import Any, SupportsFloat

import numpy as np

try:
    import gymnasium
    from gymnasium.vector import AutoresetMode, VectorEnv, VectorWrapper
except ImportError as exc:  # an optional dependency: say how to get it
    raise ImportError('vlmlabel.gym needs gymnasium: pip install "vlmlabel[gym]"') from exc

from vlmlabel.api import RewardModel
from vlmlabel.errors import VlmlabelError

MODES = ("replace", "add", "info")


def _reward_model(goal: str | None, reward_model: RewardModel | None, options: dict[str, Any]) -> RewardModel:
    """The wrapper's RewardModel: the one given (shared between wrappers), or one built for ``goal``."""
    if reward_model is not None:
        if goal is not None or options:
            given = ", ".join((["goal"] if goal is not None else []) + sorted(options))
            raise VlmlabelError(f"reward_model already fixes the goal, model and formulation; drop {given}")
        rm = reward_model
    else:
        if not goal:
            raise VlmlabelError('give the goal in words, e.g. goal="the pole is upright", or a reward_model')
        rm = RewardModel(goals=[goal], **options)
    if len(rm.goals) != 1:
        raise VlmlabelError(
            f"an environment reward is one number per step, but the reward_model has "
            f"{len(rm.goals)} goals; build it with one goal"
        )
    return rm


def _check_mode(mode: str) -> str:
    if mode not in MODES:
        raise VlmlabelError(
            f"unknown mode {mode!r}; use replace (VLM reward), add (env + VLM) or info (env reward, "
            "VLM reward only in info)"
        )
    return mode


def _check_render_mode(render_mode: str | None, what: str) -> None:
    if render_mode != "rgb_array":
        raise VlmlabelError(
            f"{what} has render_mode={render_mode!r}; the VLM reward scores rendered frames: create "
            'it with render_mode="rgb_array"'
        )


def _frame(rendered: Any) -> np.ndarray:
    if not isinstance(rendered, np.ndarray):
        raise VlmlabelError(
            f"env.render() returned {type(rendered).__name__}, not an RGB array; create the env "
            'with render_mode="rgb_array"'
        )
    return rendered


class VLMReward(gymnasium.Wrapper):
    """Replace (or add to, or annotate) an env's reward with the CLIP score of its rendered frame.

    ``options`` are RewardModel's: model, pretrained, reward, device, precision, templates, baselines,
    negatives, alpha, threshold. Pass ``reward_model=`` instead to share one loaded model.
    """

    def __init__(
        self,
        env: gymnasium.Env,
        goal: str | None = None,
        mode: str = "replace",
        reward_model: RewardModel | None = None,
        **options: Any,
    ) -> None:
        super().__init__(env)
        _check_render_mode(env.render_mode, "the environment")
        self.mode = _check_mode(mode)
        self.reward_model = _reward_model(goal, reward_model, options)
        self._episode_over = False  # the last step terminated or truncated: the next step is an autoreset

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[Any, dict[str, Any]]:
        self._episode_over = False
        return self.env.reset(seed=seed, options=options)

    def step(self, action: Any) -> tuple[Any, SupportsFloat, bool, bool, dict[str, Any]]:
        autoreset = self._episode_over
        observation, env_reward, terminated, truncated, info = self.env.step(action)
        self._episode_over = bool(terminated or truncated)
        env_value = float(env_reward)
        vlm = 0.0 if autoreset else float(self.reward_model(_frame(self.env.render()))[0])
        info = {**info, "env_reward": env_value, "vlm_reward": vlm}
        if autoreset or self.mode == "info":
            reward = env_value
        else:
            reward = vlm if self.mode == "replace" else env_value + vlm
        return observation, reward, terminated, truncated, info


class VLMRewardVector(VectorWrapper):
    """``VLMReward`` for a vector env: every sub-env's frame scored in one batch; rewards (num_envs,).

    ``info["env_reward"]`` and ``info["vlm_reward"]`` are (num_envs,) arrays with Gymnasium's ``_key`` masks;
    ``info["_vlm_reward"]`` is False for sub-envs on an autoreset step (not scored, VLM reward 0.0).
    """

    def __init__(
        self,
        env: VectorEnv,
        goal: str | None = None,
        mode: str = "replace",
        reward_model: RewardModel | None = None,
        **options: Any,
    ) -> None:
        super().__init__(env)
        _check_render_mode(env.render_mode, "the vector environment")
        autoreset_mode = env.metadata.get("autoreset_mode", AutoresetMode.NEXT_STEP)
        if autoreset_mode == AutoresetMode.SAME_STEP:
            raise VlmlabelError(
                "autoreset_mode SAME_STEP resets a sub-env inside the step that ends its episode, so "
                "its last frame can no longer be rendered; use the default NEXT_STEP (or DISABLED)"
            )
        self.autoreset_mode = autoreset_mode
        self.mode = _check_mode(mode)
        self.reward_model = _reward_model(goal, reward_model, options)
        self._autoreset = np.zeros(env.num_envs, dtype=bool)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[Any, dict[str, Any]]:
        mask = (options or {}).get("reset_mask")
        if mask is None:
            self._autoreset[:] = False
        else:
            self._autoreset[np.asarray(mask, dtype=bool)] = False
        return self.env.reset(seed=seed, options=options)

    def step(self, actions: Any) -> tuple[Any, Any, Any, Any, dict[str, Any]]:
        observations, env_rewards, terminations, truncations, infos = self.env.step(actions)
        env_values = np.asarray(env_rewards, dtype=np.float64)
        scored = ~self._autoreset if self.autoreset_mode == AutoresetMode.NEXT_STEP else np.ones_like(self._autoreset)
        vlm = np.zeros(self.num_envs, dtype=np.float32)
        if scored.any():
            frames = self.env.render()
            if frames is None or len(frames) != self.num_envs:
                raise VlmlabelError(
                    f"the vector environment rendered {0 if frames is None else len(frames)} frames "
                    f"for {self.num_envs} sub-environments"
                )
            vlm[scored] = self.reward_model([np.asarray(f) for f, s in zip(frames, scored, strict=True) if s])
        self._autoreset = np.logical_or(terminations, truncations)
        if self.mode == "info":
            rewards = env_values.copy()
        else:
            rewards = np.where(scored, vlm if self.mode == "replace" else env_values + vlm, env_values)
        everyone = np.ones(self.num_envs, dtype=bool)
        infos = {**infos, "env_reward": env_values, "_env_reward": everyone, "vlm_reward": vlm, "_vlm_reward": scored}
        return observations, rewards, terminations, truncations, infos
