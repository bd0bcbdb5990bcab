"""vlmlabel: label offline RL datasets with vision-language-model rewards."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["RewardModel", "__version__"]

if TYPE_CHECKING:
    from vlmlabel.api import RewardModel


def __getattr__(name: str) -> Any:
    # Imported on first use so `import vlmlabel` (and the CLI's start) does not pay for torch and open_clip.
    if name == "RewardModel":
        from vlmlabel.api import RewardModel

        return RewardModel
    raise AttributeError(f"module 'vlmlabel' has no attribute {name!r}")
