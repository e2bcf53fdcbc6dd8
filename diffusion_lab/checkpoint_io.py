"""Checkpoint I/O: atomic writes and code-free reads."""

from __future__ import annotations

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from diffusion_lab.fileio import atomic_path


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save into a temp file in the target's directory, fsync, os.replace (fileio.atomic_path: the umask's
    file mode); torch.load(weights_only=True).

    Lightning's default goes through an fsspec transaction whose temp file lives in the system temp dir,
    so the final move can be a cross-device copy: a crash mid-copy would leave a truncated last.ckpt.
    A same-directory rename is atomic on POSIX, so a checkpoint is either the old one or the new one.
    """

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        with atomic_path(path, fsync=True) as tmp:
            torch.save(checkpoint, tmp)

    def load_checkpoint(self, path, map_location=None, weights_only: bool | None = None) -> dict:
        # Never unpickle arbitrary objects from a checkpoint file (resume included).
        return torch.load(path, map_location=map_location or "cpu", weights_only=True)
