"""Writing a checkpoint the loaders read: safetensors weights in a chosen dtype, the processor or tokenizer beside
them. The demo target and trained drafts are saved alike."""

from __future__ import annotations

from pathlib import Path

import torch


def save_checkpoint(model: torch.nn.Module, saver, out_dir: Path, dtype: torch.dtype = torch.float32) -> None:
    """save_pretrained (safetensors) in `dtype`, plus the processor or tokenizer `saver` beside it.

    The in-memory model is left untouched: it is cast on a copy of its state, never in place.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {
        name: tensor.detach().to("cpu", dtype if tensor.is_floating_point() else tensor.dtype)
        for name, tensor in model.state_dict().items()
    }
    config = model.config
    previous = getattr(config, "dtype", None)
    config.dtype = dtype  # recorded in config.json; loaders cast to what they ask for anyway
    model.save_pretrained(out_dir, state_dict=state, safe_serialization=True)
    config.dtype = previous
    saver.save_pretrained(out_dir)
    # The weights are written through a private temporary file (mode 0600); give them the mode the other files
    # got from the umask, or a container running as another user cannot read the checkpoint.
    mode = (out_dir / "config.json").stat().st_mode & 0o777
    for weights in out_dir.glob("*.safetensors"):
        weights.chmod(mode)
