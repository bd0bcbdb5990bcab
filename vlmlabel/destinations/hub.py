"""Upload a written dataset to the Hugging Face Hub (only when --push-to-hub names a repo)."""

from __future__ import annotations

from pathlib import Path

from vlmlabel.errors import OutputError


def push(written: Path, as_dataset: bool, repo_id: str) -> None:
    """save_to_disk outputs (``as_dataset``) go through `datasets` (parquet shards, dataset card); other folders
    and files are uploaded as they are."""
    try:
        if as_dataset:
            import datasets  # only for --push-to-hub: `datasets` is slow to import, and no other write needs it

            datasets.load_from_disk(str(written)).push_to_hub(repo_id)
            return
        from huggingface_hub import HfApi  # only for --push-to-hub

        api = HfApi()
        api.create_repo(repo_id, repo_type="dataset", exist_ok=True)
        if written.is_dir():
            api.upload_folder(repo_id=repo_id, repo_type="dataset", folder_path=str(written))
        else:
            api.upload_file(
                repo_id=repo_id, repo_type="dataset", path_or_fileobj=str(written), path_in_repo=written.name
            )
    except Exception as exc:  # network, auth, permissions: the local output is complete either way
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise OutputError(
            f"rewards were written to {written}, but pushing to the Hub repo {repo_id} failed "
            f"({first}); log in with `hf auth login` and push that folder again"
        ) from None
