"""Run control: the lifecycle (open -> plan -> score -> commit), progress, shards, merge, torchrun, locks and stops."""
