"""Where a model's files are: a local directory, or a Hugging Face Hub id (torch-free, so that the HTTP
process and shoal.fleet.storage can resolve a model without importing the model code)."""

from __future__ import annotations

from pathlib import Path

# The files a model needs: config, weights, tokenizer, chat template. Not .bin/.pth copies of the weights,
# which shoal never reads (huggingface_hub's allow_patterns semantics: fnmatch on the file name).
MODEL_FILE_PATTERNS = ("*.json", "*.safetensors", "*.jinja", "tokenizer*")


def resolve_model_path(model: str) -> Path:
    """A local directory as it is; otherwise a Hugging Face Hub id, downloaded into the normal HF cache
    (huggingface_hub.snapshot_download, https://huggingface.co/docs/huggingface_hub/guides/download)."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise FileNotFoundError(f"{model}: expected a model directory, found a file")
    if model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise FileNotFoundError(f"{model}: no such model directory")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, allow_patterns=list(MODEL_FILE_PATTERNS)))
    except Exception as e:  # noqa: BLE001 - any hub failure becomes one clear message
        raise FileNotFoundError(
            f"{model}: not a local directory and could not be fetched from the Hub ({e})"
        ) from e
