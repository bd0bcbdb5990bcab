"""Run control: the lifecycle (open -> score -> commit), progress, shards, merge, torchrun, locks and stops."""
