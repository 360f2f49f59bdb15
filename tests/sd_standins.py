"""Local stand-ins for the SD metric networks (random weights: code paths only, never results):
a tiny open_clip model and a TorchScript file shaped like clean-fid's Inception, written where the
documented parameters (clip_model / clip_pretrained, fid_inception_dir) point, as a user without
internet points them at local weights."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from conftest import TINY_OPEN_CLIP_CONFIG
from safetensors.torch import save_file


class TinyInception(torch.nn.Module):
    """Shape stand-in for clean-fid's Inception TorchScript: ``layers`` maps normalised
    (B, 3, 299, 299) images to (B, 2048, 1, 1) features, as the real file's ``layers`` does, and
    ``forward(x, return_features=False)`` gives 1008 class probabilities as the real head does."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten(), torch.nn.Linear(48, 2048),
                                          torch.nn.Unflatten(1, (2048, 1, 1)))
        self.head = torch.nn.Linear(2048, 1008)

    def forward(self, x: torch.Tensor, return_features: bool = True) -> torch.Tensor:
        features = self.layers((x - 128.0) / 128.0).flatten(1)
        if return_features:
            return features
        return torch.softmax(self.head(features), dim=1)


def local_metric_weights(folder: Path, name: str = "fcr-e2e-tiny-clip") -> dict[str, str]:
    """A tiny open_clip model (config .json + safetensors checkpoint) and an Inception stand-in file:
    the parameters that point an SD evaluation at them."""
    import open_clip

    folder.mkdir(parents=True)
    config = folder / f"{name}.json"
    config.write_text(json.dumps(TINY_OPEN_CLIP_CONFIG))
    open_clip.add_model_config(config)
    torch.manual_seed(0)
    model = open_clip.create_model(name, pretrained=None)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "clip.safetensors"))
    torch.manual_seed(0)
    torch.jit.script(TinyInception()).save(str(folder / "inception-2015-12-05.pt"))
    return {"clip_model": str(config), "clip_pretrained": str(folder / "clip.safetensors"),
            "fid_inception_dir": str(folder)}
