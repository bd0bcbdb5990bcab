"""Scorers: what turns a run's frames into raw scores. The registry (``registry.SCORERS``) names them;
``base.Scorer`` is what each provides to the run lifecycle."""
