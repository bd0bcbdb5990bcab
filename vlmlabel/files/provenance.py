"""The names of the attributes that record how vlmlabel made a column: sources read them, destinations and the
run write them."""

from __future__ import annotations

# Attribute every reward vlmlabel writes carries; data without it was not written by vlmlabel.
VERSION_ATTR = "vlmlabel_version"
# Attribute naming the run that made a reward: equal ids mean identical rewards (idempotent finish).
RESULT_ATTR = "result_id"
# Attribute naming the --reward-key of the run that wrote a column: every column of one result records it.
REWARD_KEY_ATTR = "reward_key"
# Attributes linking a result's raw and per-camera columns to the reward column they belong to.
RAW_OF_ATTR = "raw_of"
CAMERA_OF_ATTR = "camera_of"
# Attribute of a reward column naming the column that keeps its raw scores (--threshold, --shaping).
RAW_KEY_ATTR = "raw_key"
# Field metadata key of a table column vlmlabel wrote: its attributes, as JSON.
PROVENANCE_KEY = b"vlmlabel"
# Root attribute of a labels file (``--link``): the file it links to and its frames (``LinkedFile``), as JSON.
LINKED_ATTR = "vlmlabel_linked_file"
