"""Development tools that vlmlabel does not need at run time (the sample-model trainer and scene renderer)."""
