"""vlmlabel: label offline RL datasets with vision-language-model rewards."""

__version__ = "0.1.0"
