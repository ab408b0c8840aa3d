"""A teacher's top-k next-token log-probabilities on disk, and the collator that feeds them back.

:class:`TopKCache` runs a teacher once over a tokenised data set (batched, with a progress bar)
and stores its top-k log-probabilities per token as NumPy memory maps, so the teacher need not be
in memory while the student trains. :class:`TopKCollator` puts each example's cached rows at the
positions its attention mask marks as tokens, so left and right padding both line up.

A cache is checked when it is opened (every file there, of the size ``meta.json`` says; offsets
starting at 0, never decreasing, ending at the token count) and each sequence when it is read
(indices in ``[0, V)``, none twice in a row, finite values): a damaged file is one line naming it.
It also holds the token ids it was built from, and the collator compares them with each batch's:
rows of another data set, or the same rows in another order, are refused even where their
lengths agree (caches written before the ids were kept are checked by length alone).
A build writes into a temporary folder renamed at the end, so an interrupted build leaves no
cache that looks complete.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from dkl.llm._checks import _flatten_tokens, packed_batch
from dkl.llm._chunk import LogitTransform
from dkl.llm.sharded import gathered_output_head, last_hidden_state, logit_transform
from dkl.llm.topk import topk_logprobs

__all__ = ["TopKCache", "TopKCacheError", "TopKCollator"]

_META_KEYS = {
    "k": int,
    "vocab_size": int,
    "tokens": int,
    "sequences": int,
    "indices_dtype": str,
    "values_dtype": str,
}
_DTYPES = {"indices_dtype": ("int32", "int64"), "values_dtype": ("float32", "float16")}


class TopKCacheError(ValueError):
    """A top-k cache that cannot be used as it is: the message names the file and the problem."""


def _fail(path: Path, problem: str) -> TopKCacheError:
    return TopKCacheError(f"top-k cache {path}: {problem}")


class TopKCache:
    """A teacher's top-k next-token log-probabilities for every token of a data set, on disk.

    Layout of the folder: ``meta.json`` (``k``, vocabulary size, dtypes, numbers of tokens and
    sequences), ``offsets.npy`` (``S + 1`` token offsets, one sequence per example),
    ``indices.bin`` and ``values.bin`` (raw ``(tokens, k)`` arrays, opened as NumPy memory maps),
    ``tokens.bin`` (the ``(tokens,)`` int32 token ids the teacher read).
    Sequence ``i``'s row ``j`` holds the teacher's prediction *at* its ``j``-th token (for the
    next one): only the tokens its attention mask marks are stored, so padding is never cached.

    Example:
        >>> import tempfile
        >>> lm = lambda ids: torch.nn.functional.one_hot(ids, 7).float() * 3  # a toy "teacher"
        >>> ids = torch.tensor([[1, 2, 3, 4], [5, 6, 0, 1]])
        >>> with tempfile.TemporaryDirectory() as d:
        ...     cache = TopKCache.build(f"{d}/c", [ids], k=2, logits_fn=lm, progress=False)
        ...     idx, val = cache[1]
        ...     print(len(cache), tuple(idx.shape), int(idx[0, 0]), round(float(val[0, 0]), 4))
        2 (4, 2) 5 -0.2614
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        meta_file = self.path / "meta.json"
        if not meta_file.is_file():
            hint = (
                " (an interrupted build leaves none: build it again)" if self.path.is_dir() else ""
            )
            raise FileNotFoundError(f"No top-k cache at {self.path}: no meta.json{hint}")
        self.meta = self._read_meta(meta_file)
        self.k, self.vocab_size = self.meta["k"], self.meta["vocab_size"]
        self.offsets = self._read_offsets(self.path / "offsets.npy")
        shape = (self.meta["tokens"], self.k)
        self.indices = self._open_map("indices.bin", self.meta["indices_dtype"], shape)
        self.values = self._open_map("values.bin", self.meta["values_dtype"], shape)
        self.token_ids = None  # caches built before the ids were kept have none
        if self.meta.get("token_ids"):
            self.token_ids = self._open_map("tokens.bin", "int32", (self.meta["tokens"], 1))

    # ----------------------------------------------------------------------------- opening
    def _read_meta(self, file: Path) -> dict:
        try:
            meta = json.loads(file.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise _fail(file, f"not readable JSON ({e})") from None
        if not isinstance(meta, dict):
            raise _fail(file, f"expected a JSON object, got {type(meta).__name__}")
        for key, kind in _META_KEYS.items():
            value = meta.get(key)
            if not isinstance(value, kind) or isinstance(value, bool):
                raise _fail(file, f"expected {key!r} a {kind.__name__}, got {value!r}")
        for key, allowed in _DTYPES.items():
            if meta[key] not in allowed:
                raise _fail(file, f"expected {key!r} one of {allowed}, got {meta[key]!r}")
        if meta["k"] < 1 or meta["tokens"] < 0 or meta["sequences"] < 0:
            raise _fail(file, f"expected k >= 1 and counts >= 0, got k = {meta['k']}")
        if meta["tokens"] and meta["vocab_size"] < meta["k"]:
            raise _fail(file, f"expected vocab_size >= k = {meta['k']}, got {meta['vocab_size']}")
        return meta

    def _read_offsets(self, file: Path) -> np.ndarray:
        try:
            offsets = np.load(file, allow_pickle=False)
        except FileNotFoundError:
            raise _fail(file, "missing") from None
        except (OSError, ValueError, EOFError) as e:
            raise _fail(file, f"not a NumPy array file ({e})") from None
        n_seq = self.meta["sequences"]
        if offsets.ndim != 1 or not np.issubdtype(offsets.dtype, np.integer):
            raise _fail(file, f"expected 1-D integers, got {offsets.dtype} {offsets.shape}")
        if len(offsets) != n_seq + 1:
            raise _fail(file, f"expected {n_seq + 1} offsets (sequences + 1), got {len(offsets)}")
        if offsets[0] != 0 or offsets[-1] != self.meta["tokens"]:
            raise _fail(
                file,
                f"expected offsets from 0 to the token count {self.meta['tokens']}, got "
                f"{int(offsets[0])} to {int(offsets[-1])}",
            )
        drops = np.flatnonzero(np.diff(offsets) < 0)
        if len(drops):
            i = int(drops[0])
            raise _fail(
                file,
                f"offsets decrease at sequence {i} ({int(offsets[i])} -> {int(offsets[i + 1])})",
            )
        return offsets.astype(np.int64)

    def _open_map(self, name: str, dtype: str, shape: tuple[int, int]) -> np.ndarray:
        file = self.path / name
        if not file.is_file():
            raise _fail(file, "missing")
        want = shape[0] * shape[1] * np.dtype(dtype).itemsize
        got = file.stat().st_size
        if got != want:
            what = "truncated" if got < want else "longer than meta.json says"
            raise _fail(
                file,
                f"{what}: expected {want} bytes ({shape[0]} tokens x k = {shape[1]} x {dtype}), "
                f"got {got}",
            )
        if shape[0] == 0:
            return np.zeros(shape, dtype=dtype)
        return np.memmap(file, dtype=dtype, mode="r", shape=shape)

    # ----------------------------------------------------------------------------- reading
    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        """Sequence ``i``: ``(indices (L, k) int64, values (L, k) float32)``, checked."""
        if isinstance(i, bool) or not isinstance(i, int | np.integer):
            raise TypeError(f"Expected an integer sequence index, got {type(i).__name__}")
        if not -len(self) <= i < len(self):
            raise IndexError(f"Expected a sequence index in [0, {len(self)}), got {i}")
        i = int(i) % len(self)
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        idx = np.array(self.indices[a:b], dtype=np.int64)
        val = np.array(self.values[a:b], dtype=np.float32)
        self._check_rows(i, idx, val)
        return torch.from_numpy(idx), torch.from_numpy(val)

    def _check_rows(self, seq: int, idx: np.ndarray, val: np.ndarray) -> None:
        if not idx.size:
            return
        bad = (idx < 0) | (idx >= self.vocab_size)
        if bad.any():
            row = int(np.flatnonzero(bad.any(1))[0])
            raise _fail(
                self.path / "indices.bin",
                f"sequence {seq}, token {row}: index {int(idx[row][bad[row]][0])} outside "
                f"[0, {self.vocab_size})",
            )
        ordered = np.sort(idx, axis=1)
        dup = (ordered[:, 1:] == ordered[:, :-1]).any(1)
        if dup.any():
            row = int(np.flatnonzero(dup)[0])
            raise _fail(
                self.path / "indices.bin",
                f"sequence {seq}, token {row}: the same index twice among its top-k",
            )
        bad = np.isnan(val) | (val > 0)  # log-probabilities: <= 0, -inf allowed (probability 0)
        if bad.any():
            row = int(np.flatnonzero(bad.any(1))[0])
            value = float(val[row][bad[row]][0])
            raise _fail(
                self.path / "values.bin",
                f"sequence {seq}, token {row}: value {value} is no log-probability",
            )

    def verify(self) -> None:
        """Read every sequence once and check it (``__getitem__`` checks only what it reads)."""
        for i in range(len(self)):
            self[i]

    def batch(
        self,
        rows: Sequence[int],
        length: int | None = None,
        *,
        mask: Tensor | None = None,
        input_ids: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Sequences ``rows`` as ``(B, L, k)`` indices and values.

        Without ``mask`` each sequence fills the first positions (right padding). With ``mask``
        ``(B, L)`` (a batch's attention mask) sequence ``b`` fills the positions where
        ``mask[b]`` is 1, in order, so left padding works too; its token count must equal the
        mask's. Positions left empty hold index 0 and value ``-inf`` (probability 0): they must
        carry the label ``-100``. With ``input_ids`` ``(B, L)`` the batch's tokens at those
        positions must be the ones the cache was built from.
        """
        items = [self[int(r)] for r in rows]
        if mask is not None:
            L = mask.shape[1]
        else:
            L = max((len(i) for i, _ in items), default=0) if length is None else length
        idx = torch.zeros(len(items), L, self.k, dtype=torch.long)
        val = torch.full((len(items), L, self.k), -float("inf"), dtype=torch.float32)
        for j, (i, v) in enumerate(items):
            if mask is None:
                n = min(len(i), L)
                idx[j, :n], val[j, :n] = i[:n], v[:n]
                self._check_tokens(j, int(rows[j]), input_ids, torch.arange(n))
                continue
            where = mask[j].bool().nonzero().squeeze(1)
            if len(where) != len(i):
                raise TopKCacheError(
                    f"example {j} of the batch (cache sequence {int(rows[j])}) has "
                    f"{len(where)} tokens, but the cache holds {len(i)}: it was built from other "
                    "data, or the collator truncates or packs; build the cache from the data set "
                    "as the collator sees it"
                )
            idx[j, where], val[j, where] = i, v
            self._check_tokens(j, int(rows[j]), input_ids, where.cpu())
        return idx, val

    def _check_tokens(self, j: int, seq: int, input_ids: Tensor | None, where: Tensor) -> None:
        """Batch row ``j``'s tokens at ``where`` against cache sequence ``seq``'s."""
        if input_ids is None or self.token_ids is None:
            return
        seq %= len(self)  # a negative index, as __getitem__ takes it
        a = int(self.offsets[seq])
        cached = torch.from_numpy(np.array(self.token_ids[a : a + len(where), 0], dtype=np.int64))
        given = input_ids[j].cpu()[where].long()
        differ = (given != cached).nonzero()
        if len(differ):
            p = int(differ[0])
            raise TopKCacheError(
                f"example {j} of the batch (cache sequence {seq}) is not the text the cache was "
                f"built from: its token {p} is {int(given[p])}, the cache's {int(cached[p])} (other "
                "data, another order, or a collator that changes the tokens); build the cache from "
                "the data set as the collator sees it"
            )

    # ----------------------------------------------------------------------------- building
    @classmethod
    def build(
        cls,
        path: str | Path,
        data: Iterable[Tensor | Mapping[str, Any]],
        *,
        k: int,
        model: Any = None,
        logits_fn: Callable[[Tensor], Tensor] | None = None,
        batch_size: int | None = None,
        pad_token_id: int = 0,
        chunk_size: int = 1024,
        logit_scale: float | None = None,
        softcap: float | None = None,
        values_dtype: str = "float32",
        progress: bool = True,
    ) -> TopKCache:
        """Run a teacher over ``data`` and write its top-k log-probabilities to ``path``.

        Args:
            path: folder to create (must not hold a cache already).
            data: batches: ``(B, L)`` input ids, or dicts with ``input_ids`` and optionally
                ``attention_mask`` (only positions with mask 1 are stored, left or right
                padding alike; one sequence per row). With ``batch_size``: examples instead
                (dicts with 1-D ``input_ids``, e.g. a tokenised ``datasets.Dataset``), batched
                here with right padding by ``pad_token_id`` and an attention mask.
            k: entries kept per token.
            model: a causal LM (Hugging Face style: called with ``output_hidden_states=True``,
                ``get_output_embeddings()`` gives its head); its logits are formed
                ``chunk_size`` tokens at a time, never all at once.
            logits_fn: instead of ``model``, a function ``input_ids -> (B, L, V)`` logits.
            logit_scale, softcap: the teacher's logit transform (as in
                :func:`~dkl.llm.fused_linear_ikl`), applied before the softmax. With neither
                given, a ``model``'s own is read from its config (Gemma-2's
                ``final_logit_softcapping``, Cohere's ``logit_scale``, Granite's
                ``logits_scaling``), as the distillation trainer reads it; ``logits_fn``'s
                logits are taken as they are.
            values_dtype: ``"float32"`` or ``"float16"`` on disk.
            progress: a progress bar over the batches (tqdm; drawn on a terminal).
        """
        if (model is None) == (logits_fn is None):
            raise ValueError("Expected exactly one of model= or logits_fn=")
        if values_dtype not in ("float32", "float16"):
            raise ValueError(f"Expected values_dtype 'float32' or 'float16', got {values_dtype!r}")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"Expected k a positive int, got {k!r}")
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"Expected batch_size a positive int (or None), got {batch_size!r}")
        path = Path(path)
        if (path / "meta.json").exists():
            raise FileExistsError(f"A top-k cache already exists at {path}")
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        if model is not None and logit_scale is None and softcap is None:
            found = logit_transform(model)
            logit_scale, softcap = found["logit_scale"], found["softcap"]
        tf = LogitTransform(1.0 if logit_scale is None else float(logit_scale), softcap)
        batches = _batched(data, batch_size, pad_token_id) if batch_size else data
        total = None
        if hasattr(data, "__len__"):
            total = -(-len(data) // batch_size) if batch_size else len(data)
        offsets, vocab = [0], None
        try:
            with (
                open(tmp / "indices.bin", "wb") as f_idx,
                open(tmp / "values.bin", "wb") as f_val,
                open(tmp / "tokens.bin", "wb") as f_tok,
                torch.no_grad(),
            ):
                bar = tqdm(
                    batches,
                    total=total,
                    desc="top-k cache",
                    unit="batch",
                    disable=True if not progress else None,  # None: off where no terminal
                )
                for batch in bar:
                    inputs = dict(batch) if isinstance(batch, Mapping) else {"input_ids": batch}
                    idx, val, v = _teacher_topk(inputs, k, model, logits_fn, chunk_size, tf)
                    if vocab is not None and v != vocab:
                        raise ValueError(
                            f"Expected the same vocabulary in every batch, got {vocab} then {v}"
                        )
                    vocab = v
                    ids = inputs["input_ids"]
                    keep = inputs.get("attention_mask")
                    keep = torch.ones_like(ids, dtype=torch.bool) if keep is None else keep.bool()
                    for row in range(ids.shape[0]):
                        sel = keep[row].to(idx.device)
                        f_idx.write(idx[row][sel].to(torch.int32).cpu().numpy().tobytes())
                        f_val.write(val[row][sel].cpu().numpy().astype(values_dtype).tobytes())
                        f_tok.write(
                            ids[row][sel.to(ids.device)].to(torch.int32).cpu().numpy().tobytes()
                        )
                        offsets.append(offsets[-1] + int(sel.sum()))
            np.save(tmp / "offsets.npy", np.asarray(offsets, dtype=np.int64))
            meta = {
                "k": k,
                "vocab_size": vocab if vocab is not None else 0,
                "tokens": offsets[-1],
                "sequences": len(offsets) - 1,
                "indices_dtype": "int32",
                "values_dtype": values_dtype,
                "values": "log-probabilities",
                "logit_scale": tf.scale,
                "softcap": softcap,
                "token_ids": True,
            }
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
            if path.exists():
                path.rmdir()  # an empty folder the caller made; anything else raises here
            tmp.rename(path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return cls(path)


def _batched(examples: Iterable[Mapping[str, Any]], size: int, pad: int):
    """Examples with 1-D ``input_ids`` into right-padded batches with an attention mask."""
    group: list[Tensor] = []

    def emit():
        L = max(len(x) for x in group)
        ids = torch.full((len(group), L), pad, dtype=torch.long)
        mask = torch.zeros((len(group), L), dtype=torch.long)
        for j, x in enumerate(group):
            ids[j, : len(x)], mask[j, : len(x)] = x, 1
        return {"input_ids": ids, "attention_mask": mask}

    for i, ex in enumerate(examples):
        if not isinstance(ex, Mapping) or "input_ids" not in ex:
            got = type(ex).__name__ if not isinstance(ex, Mapping) else sorted(ex)
            raise ValueError(f"Expected example {i} a dict with input_ids, got {got}")
        ids = torch.as_tensor(ex["input_ids"], dtype=torch.long)
        if ids.dim() != 1:
            raise ValueError(f"Expected example {i}'s input_ids 1-D, got {tuple(ids.shape)}")
        group.append(ids)
        if len(group) == size:
            yield emit()
            group = []
    if group:
        yield emit()


def _teacher_topk(inputs, k, model, logits_fn, chunk_size, tf):
    """``(indices, values, V)`` of one batch: the teacher's top-k log-probabilities."""
    ids = inputs["input_ids"]
    if logits_fn is not None:
        logits = logits_fn(ids)
        idx, val = topk_logprobs(tf(logits.float())[0], k)
        return idx, val, logits.shape[-1]
    hidden = _flatten_tokens(last_hidden_state(model, inputs, transform=tf), "hidden")
    with gathered_output_head(model, grad=False) as (w, b):
        parts = [
            topk_logprobs(tf(F.linear(hidden[s : s + chunk_size], w, b).float())[0], k)
            for s in range(0, hidden.shape[0], chunk_size)
        ]
        vocab = w.shape[0]
    idx = torch.cat([p[0] for p in parts]).reshape(*ids.shape, k)
    val = torch.cat([p[1] for p in parts]).reshape(*ids.shape, k)
    return idx, val, vocab


class TopKCollator:
    """Wraps a collator: adds ``teacher_topk_indices`` / ``teacher_topk_values`` ``(B, L, k)``
    from a :class:`TopKCache`, read for each example's ``index_key`` (removed before the wrapped
    collator sees the examples).

    Each cached sequence goes to the positions the batch's ``attention_mask`` marks, so left and
    right padding both line up; a batch without an attention mask must be unpadded. A token
    predicted from a padded position (the first token under left padding) has no cached teacher
    prediction, so its label is set to ``-100``. Packed
    batches (several sequences in one row) are refused: the cache holds one sequence per example.
    With Hugging Face's ``Trainer`` keep the column with
    ``TrainingArguments(remove_unused_columns=False)``.
    """

    def __init__(self, collator: Callable, cache: TopKCache, index_key: str = "cache_index"):
        self.collator, self.cache, self.index_key = collator, cache, index_key

    def __call__(self, features: list[dict]) -> dict:
        try:
            rows = [int(f[self.index_key]) for f in features]
        except KeyError:
            raise KeyError(
                f"Expected each example to carry {self.index_key!r} (its row in the top-k "
                "cache); keep the column with remove_unused_columns=False"
            ) from None
        batch = dict(
            self.collator([{k: v for k, v in f.items() if k != self.index_key} for f in features])
        )
        packed = packed_batch(batch)
        if packed:
            raise TopKCacheError(
                f"a packed batch ({packed}) cannot take a top-k cache, which holds one "
                "sequence per example: turn packing off (e.g. SFTConfig(packing=False))"
            )
        mask = batch.get("attention_mask")
        if mask is None:
            offsets = self.cache.offsets
            lengths = {int(offsets[r + 1] - offsets[r]) for r in rows}  # no read of the rows
            L = batch["input_ids"].shape[1]
            if lengths != {L}:
                raise TopKCacheError(
                    "a padded batch without an attention_mask: the cached rows cannot be placed "
                    "(left or right padding?); let the collator return attention_mask"
                )
        batch["teacher_topk_indices"], batch["teacher_topk_values"] = self.cache.batch(
            rows, batch["input_ids"].shape[1], mask=mask, input_ids=batch["input_ids"]
        )
        labels = batch.get("labels")
        if mask is not None and labels is not None and "shift_labels" not in batch:
            # a token predicted from a padded position (the first one, under left padding) has
            # no cached teacher row: it is left out, as padding is
            from_padding = torch.zeros_like(mask, dtype=torch.bool)
            from_padding[:, 1:] = mask[:, :-1] == 0
            batch["labels"] = labels.masked_fill(from_padding, -100)
        return batch
