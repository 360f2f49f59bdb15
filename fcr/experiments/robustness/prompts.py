"""Out-of-distribution prompt lists shipped with the package (``fcr/prompt_lists``), their cached
text states, and the prompt sets of every stress in either setting (:class:`StressPrompts`)."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from fcr.backends.embedded import data
from fcr.backends.embedded.model import PromptSet

OOD_FILES: dict[str, str] = {"paraphrase": "fashion_paraphrases.tsv", "compositional": "fashion_compositional.tsv"}
SD_OOD_FILES: dict[str, str] = {"abstract": "sd_abstract.txt", "medical": "sd_medical.txt"}


# ----------------------------------------------------------------------------- OOD prompts


def _prompt_list_text(name: str) -> str:
    return resources.files("fcr").joinpath("prompt_lists", name).read_text(encoding="utf-8")


def _parse_label(field: str, where: str) -> int:
    field = field.strip()
    if field.isdigit():
        label = int(field)
        if not 0 <= label < len(data.FASHION_MNIST_CLASSES):
            raise ValueError(f"{where}: label index {label} outside 0..{len(data.FASHION_MNIST_CLASSES) - 1}")
        return label
    names = {c.lower(): i for i, c in enumerate(data.FASHION_MNIST_CLASSES)}
    if field.lower() not in names:
        raise ValueError(f"{where}: unknown class {field!r}; allowed: {list(data.FASHION_MNIST_CLASSES)}")
    return names[field.lower()]


def load_ood_prompts() -> pd.DataFrame:
    """The embedded model's out-of-distribution prompts: columns ``label`` (class index),
    ``class_name``, ``kind`` (``paraphrase`` / ``compositional``) and ``prompt``, from the TSV
    files of :data:`OOD_FILES` (``class name or index <TAB> prompt``; ``#`` starts a comment)."""
    rows = []
    for kind, name in OOD_FILES.items():
        for n, line in enumerate(_prompt_list_text(name).splitlines(), start=1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            parts = line.split("\t")
            if len(parts) != 2 or not parts[1].strip():
                raise ValueError(f"{name}:{n}: expected 'class<TAB>prompt', got {line!r}")
            label = _parse_label(parts[0], f"{name}:{n}")
            rows.append({"label": label, "class_name": data.FASHION_MNIST_CLASSES[label], "kind": kind,
                         "prompt": " ".join(parts[1].split())})
    table = pd.DataFrame(rows)
    dupes = table["prompt"][table["prompt"].duplicated()].tolist()
    if dupes:
        raise ValueError(f"duplicated OOD prompts: {dupes}")
    return table


def load_sd_prompt_list(kind: str) -> list[str]:
    """Unlabelled SD out-of-distribution prompts of ``kind`` (``abstract`` / ``medical``), one a line."""
    if kind not in SD_OOD_FILES:
        raise ValueError(f"unknown SD prompt list {kind!r}; allowed: {sorted(SD_OOD_FILES)}")
    lines = _prompt_list_text(SD_OOD_FILES[kind]).splitlines()
    return [" ".join(line.split()) for line in lines if line.strip() and not line.lstrip().startswith("#")]


def prompt_files_digest(files: Mapping[str, str]) -> str:
    h = hashlib.sha256()
    for name in sorted(files.values()):
        h.update(_prompt_list_text(name).encode())
    return h.hexdigest()[:16]


def ood_text_states(
    prompts: Sequence[str], cache_path: str | Path, max_length: int, encoder: Any = None
) -> dict[str, torch.Tensor]:
    """MiniLM token states of ``prompts`` and of the empty prompt, cached in ``cache_path``
    (:func:`fcr.backends.embedded.text.build_text_state_cache`; a cache lacking a prompt is rebuilt)."""
    from fcr.backends.embedded.text import MINILM_NAME, TextEncoder, build_text_state_cache, load_text_state_cache

    wanted = list(dict.fromkeys([*prompts, ""]))
    path = Path(cache_path)
    if path.is_file():
        try:
            return load_text_state_cache(path, wanted, max_length=max_length, encoder_name=MINILM_NAME)
        except ValueError:
            pass  # other prompts, length or encoder: rebuilt below
    encoder = encoder or TextEncoder.from_minilm()
    return build_text_state_cache(wanted, encoder, path, max_length=max_length, overwrite=True)


def ood_prompt_set(
    table: pd.DataFrame, states: Mapping[str, torch.Tensor], n: int, seed: int
) -> tuple[PromptSet, list[str]]:
    """``n`` class-balanced OOD prompts (labels cycle 0..9 as in
    :func:`fcr.backends.embedded.model.embedded_prompt_set`), image ``i`` taking a seeded choice among its
    class's prompts; returns the prompt set (noise seed ``seed``) and each image's prompt kind."""
    labels = np.arange(n, dtype=np.int64) % len(data.FASHION_MNIST_CLASSES)
    rng = np.random.default_rng([int(seed), 11])
    by_class = {label: group.reset_index(drop=True) for label, group in table.groupby("label")}
    missing = sorted(set(labels.tolist()) - set(by_class))
    if missing:
        raise ValueError(f"no OOD prompts for classes {missing}")
    picks = [by_class[int(label)].iloc[int(rng.integers(len(by_class[int(label)])))] for label in labels]
    texts = [row["prompt"] for row in picks]
    prompt_set = PromptSet(
        labels=labels, texts=texts, states=torch.stack([states[t] for t in texts]), empty_state=states[""], seed=seed
    )
    return prompt_set, [row["kind"] for row in picks]


def sd_ood_prompts(n: int, seed: int) -> tuple[list[str], list[str]]:
    """``n`` SD OOD prompts alternating the shipped lists (abstract, medical), a seeded choice within
    each; returns the prompts and each one's list."""
    lists = {name: load_sd_prompt_list(name) for name in SD_OOD_FILES}
    kinds = [list(lists)[i % len(lists)] for i in range(n)]
    rng = np.random.default_rng([int(seed), 13])
    return [lists[k][int(rng.integers(len(lists[k])))] for k in kinds], kinds


class StressPrompts:
    """The prompts of each stress's prompt kind (``train`` / ``heldout`` / ``ood``) for a run context
    (:class:`fcr.eval.context.RunContext`): ``ood`` is the shipped OOD lists (embedded: labelled
    Fashion-MNIST paraphrases and compositions, text states cached in ``cache_dir``; SD: abstract
    and medical lists); the others are the setting's evaluation prompts. :meth:`get` returns the
    prompts and, for ``ood``, each prompt's list (``kinds``, None otherwise)."""

    def __init__(self, ctx: Any, kinds: set[str], cache_dir: Path, max_text_length: int) -> None:
        self.ctx = ctx
        self.files = SD_OOD_FILES if ctx.setting == "sd" else OOD_FILES
        self._table = self._states = None
        if "ood" in kinds and ctx.setting != "sd":
            self._table = load_ood_prompts()
            self._states = ood_text_states(self._table["prompt"].tolist(), cache_dir / "text_states_ood.safetensors",
                                           max_length=max_text_length)

    def get(self, kind: str, n: int, seed: int) -> tuple[Any, list[str] | None]:
        if kind == "ood":
            if self.ctx.setting == "sd":
                return sd_ood_prompts(n, seed)
            return ood_prompt_set(self._table, self._states, n, seed)
        return self.ctx.eval_prompts(n, seed, templates=kind), None
