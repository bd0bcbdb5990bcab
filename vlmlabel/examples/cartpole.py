"""CartPole-v1 with a CLIP reward: random actions, no training; prints what the VLM reward looked like.

    python -m vlmlabel.examples.cartpole                       # the repository's tiny demo CLIP, offline
    python -m vlmlabel.examples.cartpole --model ViT-B-32      # a real CLIP (downloads or reads the HF cache)
    python -m vlmlabel.examples.cartpole --num-envs 4          # a vector env, 4 frames scored per forward pass

Needs gymnasium: ``pip install "vlmlabel[gym]"``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

DEMO_MODEL = Path(__file__).resolve().parents[2] / "sample_data" / "reach-clip"
DEFAULT_GOAL = "a pole standing upright on a cart"


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m vlmlabel.examples.cartpole", description=(__doc__ or "").split("\n")[0]
    )
    parser.add_argument(
        "--model",
        help="open_clip model, hf-hub:ORG/REPO or a local folder "
        "(default: the repository's demo CLIP sample_data/reach-clip)",
    )
    parser.add_argument("--pretrained", help="open_clip pretrained tag or checkpoint file")
    parser.add_argument("--goal", default=DEFAULT_GOAL, help=f"the goal in words (default: {DEFAULT_GOAL!r})")
    parser.add_argument("--steps", type=int, default=300, help="environment steps (per sub-env; default 300)")
    parser.add_argument("--num-envs", type=int, default=1, help="sub-environments; >1 uses VLMRewardVector")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _arguments(argv)
    os.environ.setdefault("SDL_VIDEODRIVER", "dummy")  # rgb_array rendering needs no display
    # Imported once the variable above is set, and only to run: --help needs neither gymnasium (the optional
    # `gym` extra) nor torch.
    import gymnasium as gym

    from vlmlabel import RewardModel
    from vlmlabel.errors import VlmlabelError
    from vlmlabel.gym import VLMReward, VLMRewardVector

    model = args.model
    if model is None:
        if not DEMO_MODEL.is_dir():
            print(
                "no --model given and the demo CLIP sample_data/reach-clip is not here (it ships with the "
                "repository, not the package); pass --model ViT-B-32 or a local model folder",
                file=sys.stderr,
            )
            return 2
        model = str(DEMO_MODEL)
        print(
            f"model: the demo CLIP {DEMO_MODEL} (trained on synthetic 2D scenes: it runs offline, but its "
            "rewards mean nothing on CartPole; pass --model ViT-B-32 for a real CLIP)"
        )
    else:
        print(f"model: {model}" + (f" ({args.pretrained})" if args.pretrained else ""))
    try:
        reward_model = RewardModel(model=model, pretrained=args.pretrained, goals=[args.goal], device=args.device)
    except VlmlabelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"goal: {args.goal!r}  device: {reward_model.device}  steps: {args.steps}  envs: {args.num_envs}")

    vlm_rewards: list[np.ndarray] = []
    env_reward_sum, episodes = 0.0, 0
    if args.num_envs > 1:
        vec = VLMRewardVector(
            gym.make_vec("CartPole-v1", num_envs=args.num_envs, vectorization_mode="sync", render_mode="rgb_array"),
            reward_model=reward_model,
        )
        vec.reset(seed=args.seed)
        vec.action_space.seed(args.seed)
        for _ in range(args.steps):
            _, _, terminated, truncated, info = vec.step(vec.action_space.sample())
            vlm_rewards.append(info["vlm_reward"][info["_vlm_reward"]])  # autoreset steps are not scored
            env_reward_sum += float(info["env_reward"].sum())
            episodes += int(np.logical_or(terminated, truncated).sum())
        vec.close()
    else:
        env = VLMReward(gym.make("CartPole-v1", render_mode="rgb_array"), reward_model=reward_model)
        env.reset(seed=args.seed)
        env.action_space.seed(args.seed)
        for _ in range(args.steps):
            _, _, terminated, truncated, info = env.step(env.action_space.sample())
            vlm_rewards.append(np.array([info["vlm_reward"]], dtype=np.float32))
            env_reward_sum += info["env_reward"]
            if terminated or truncated:
                episodes += 1
                env.reset()
        env.close()
    vlm = np.concatenate(vlm_rewards)
    print(f"vlm reward over {len(vlm)} scored steps: min {vlm.min():.4f}  mean {vlm.mean():.4f}  max {vlm.max():.4f}")
    print(f"env reward sum: {env_reward_sum:.1f}  episodes ended: {episodes}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
