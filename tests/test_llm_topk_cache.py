"""TopKCache / TopKCollator without traps: padding sides, packing, damaged files, interrupted builds.

The oracle for alignment is ``F.kl_div`` between the student's logits on the padded batch and the
teacher's logits on each *unpadded* sequence (what the cache stores), position by position.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from llm_helpers import tiny_llama

from dkl.llm import TopKCache, TopKCacheError, TopKCollator

pytest.importorskip("transformers")
from dkl.integrations.transformers import (
    DistillationArguments,
    causal_lm_distillation_loss,
)

V = 24


def _llama(hidden, seed):
    return tiny_llama(V, hidden, 1, seed).eval()


def _examples():
    g = torch.Generator().manual_seed(0)
    return [
        {"input_ids": torch.randint(1, V, (n,), generator=g), "cache_index": i}
        for i, n in enumerate((7, 4, 6, 3))
    ]


def _padding_collator(side: str):
    def collate(features):
        L = max(len(f["input_ids"]) for f in features)
        ids = torch.zeros(len(features), L, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, f in enumerate(features):
            n = len(f["input_ids"])
            cols = slice(L - n, L) if side == "left" else slice(0, n)
            ids[j, cols], mask[j, cols] = f["input_ids"], 1
        labels = ids.masked_fill(mask == 0, -100)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    return collate


@pytest.fixture(scope="module")
def models_and_cache(tmp_path_factory):
    teacher, student = _llama(16, 1), _llama(12, 0)
    path = tmp_path_factory.mktemp("cache") / "top"
    data = [{"input_ids": e["input_ids"]} for e in _examples()]
    cache = TopKCache.build(path, data, k=V, model=teacher, batch_size=3, progress=False)
    return teacher, student, cache


def _kl_reference(student, teacher, batch, temperature):
    """Mean over positions with a next-token label of KL(teacher || student), where the teacher
    sees each sequence unpadded."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        zs = student(**inputs).logits.double()
    rows = []
    for j in range(len(batch["input_ids"])):
        where = batch["attention_mask"][j].bool().nonzero().squeeze(1)
        with torch.no_grad():
            zt = teacher(input_ids=batch["input_ids"][j, where][None]).logits[0].double()
        labels = batch["labels"][j, where]
        keep = labels[1:] != -100  # position i predicts token i + 1
        s = F.log_softmax(zs[j, where][:-1][keep] / temperature, -1)
        t = F.log_softmax(zt[:-1][keep] / temperature, -1)
        rows.append(F.kl_div(s, t, log_target=True, reduction="none").sum(-1))
    return torch.cat(rows).mean()


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("tail", ["renormalize", "uniform"])
def test_cached_teacher_lines_up_with_either_padding_side(models_and_cache, side, tail):
    teacher, student, cache = models_and_cache
    collate = TopKCollator(_padding_collator(side), cache)
    batch = collate(_examples())
    if side == "left":  # a token predicted from padding has no teacher: its label is dropped
        first = batch["attention_mask"].argmax(1)
        assert all(batch["labels"][j, f] == -100 for j, f in enumerate(first.tolist()) if f)
    distill = DistillationArguments(loss="kl", temperature=2.0, topk_tail=tail)
    total, _, count = causal_lm_distillation_loss(student, None, dict(batch), distill)
    ref = _kl_reference(student, teacher, batch, 2.0)
    torch.testing.assert_close((total / count).double(), ref, rtol=1e-5, atol=1e-6)


def test_packed_or_unplaceable_batches_are_refused(models_and_cache):
    _, _, cache = models_and_cache

    def packed(features):
        out = _padding_collator("right")(features)
        out["seq_lengths"] = torch.tensor([3, 4])
        return out

    with pytest.raises(TopKCacheError, match="packed batch .*'seq_lengths'.* packing"):
        TopKCollator(packed, cache)(_examples()[:2])

    def no_mask(features):
        out = _padding_collator("right")(features)
        del out["attention_mask"]
        return out

    with pytest.raises(TopKCacheError, match="without an attention_mask"):
        TopKCollator(no_mask, cache)(_examples()[:2])

    def truncating(features):
        out = _padding_collator("right")(features)
        return {k: v[:, :5] for k, v in out.items()}

    with pytest.raises(TopKCacheError, match=r"example 0 .*sequence 0\) has 5 tokens.*holds 7"):
        TopKCollator(truncating, cache)(_examples()[:2])


def _one_hot_lm(ids):
    return F.one_hot(ids, 7).float() * 3


def _small_cache(tmp_path, name="c"):
    ids = torch.tensor([[1, 2, 3, 4], [5, 6, 0, 1]])
    return TopKCache.build(tmp_path / name, [ids], k=3, logits_fn=_one_hot_lm, progress=False)


def _damage(path, name, fn):
    file = path / name
    fn(file)
    return file


@pytest.mark.parametrize(
    "name, damage, message",
    [
        ("meta.json", lambda f: f.write_text("{not json"), "meta.json: not readable JSON"),
        (
            "meta.json",
            lambda f: f.write_text(json.dumps({**json.loads(f.read_text()), "k": "3"})),
            "meta.json: expected 'k' a int, got '3'",
        ),
        (
            "offsets.npy",
            lambda f: np.save(f, np.array([0, 9, 8])),
            "offsets decrease at sequence 1 \\(9 -> 8\\)",
        ),
        ("offsets.npy", lambda f: np.save(f, np.array([0, 4, 9])), "to the token count 8"),
        ("offsets.npy", lambda f: f.write_bytes(b"\x89PNG\r\n"), "not a NumPy array file"),
        ("offsets.npy", lambda f: f.unlink(), "offsets.npy: missing"),
        ("indices.bin", lambda f: f.write_bytes(f.read_bytes()[:-4]), "indices.bin: truncated"),
        ("values.bin", lambda f: f.write_bytes(f.read_bytes() * 2), "values.bin: longer than"),
        ("values.bin", lambda f: f.unlink(), "values.bin: missing"),
    ],
)
def test_damaged_cache_files_are_named(tmp_path, name, damage, message):
    cache = _small_cache(tmp_path)
    _damage(cache.path, name, damage)
    with pytest.raises(TopKCacheError, match=message):
        TopKCache(cache.path)


@pytest.mark.parametrize(
    "column, value, message",
    [
        ("indices", 7, "index 7 outside \\[0, 7\\)"),
        ("indices", -1, "index -1 outside"),
        ("indices", "dup", "the same index twice"),
        ("values", float("nan"), "value nan is no log-probability"),
        ("values", 0.5, "value 0.5 is no log-probability"),
    ],
)
def test_bad_entries_are_refused_when_read(tmp_path, column, value, message):
    cache = _small_cache(tmp_path)
    dtype = np.int32 if column == "indices" else np.float32
    arr = np.fromfile(cache.path / f"{column}.bin", dtype=dtype).reshape(-1, 3)
    arr[5, 1] = arr[5, 0] if value == "dup" else value  # sequence 1, token 1
    arr.tofile(cache.path / f"{column}.bin")
    reopened = TopKCache(cache.path)
    reopened[0]  # the other sequence reads fine
    with pytest.raises(TopKCacheError, match=f"{column}.bin: sequence 1, token 1: {message}"):
        reopened[1]
    with pytest.raises(TopKCacheError, match=message):
        reopened.verify()


def test_interrupted_build_leaves_no_cache(tmp_path):
    calls = []

    def flaky(ids):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return F.one_hot(ids, 7).float()

    batches = [torch.tensor([[1, 2]]), torch.tensor([[3, 4]])]
    with pytest.raises(KeyboardInterrupt):
        TopKCache.build(tmp_path / "c", batches, k=2, logits_fn=flaky, progress=False)
    assert list(tmp_path.iterdir()) == []  # neither the cache nor its temporary folder
    with pytest.raises(FileNotFoundError, match="no meta.json"):
        TopKCache(tmp_path / "c")
    cache = TopKCache.build(tmp_path / "c", batches, k=2, logits_fn=flaky, progress=False)
    assert len(cache) == 2


def test_build_from_examples_equals_build_from_batches(tmp_path):
    teacher = _llama(16, 1)
    examples = [{"input_ids": e["input_ids"].tolist()} for e in _examples()]
    a = TopKCache.build(tmp_path / "a", examples, k=5, model=teacher, batch_size=2, progress=False)
    batches = [
        _padding_collator("left")([{"input_ids": torch.tensor(e["input_ids"])}]) for e in examples
    ]
    # the collator's labels stay in the batches: they are the loss's, not the model's (a
    # Hugging Face model given labels computes its own CE, which failed on these shapes)
    assert all("labels" in b for b in batches)
    b = TopKCache.build(tmp_path / "b", batches, k=5, model=teacher, progress=False)
    assert len(a) == len(b) == 4
    for i in range(4):
        torch.testing.assert_close(a[i][1], b[i][1], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="Expected example 0 a dict with input_ids"):
        TopKCache.build(tmp_path / "x", [[1, 2]], k=2, model=teacher, batch_size=2)


def test_topk_batches_padded_with_zeros_and_duplicates():
    """Zero-padded rows (a collator's padding) never reach the tail check; duplicate indices on a
    counted token are refused."""
    from dkl.llm import fused_linear_kl

    torch.manual_seed(0)
    hs, ws = torch.randn(2, 5, 8), torch.randn(V, 8)
    idx = torch.stack([torch.randperm(V)[:4] for _ in range(10)]).reshape(2, 5, 4)
    val = torch.log_softmax(torch.randn(2, 5, V), -1)[..., :4]
    labels = torch.ones(2, 5, dtype=torch.long)
    idx[1, 3:], val[1, 3:], labels[1, 3:] = 0, 0.0, -100  # padding: index 0, value 0 (sum 4 > 1)
    kw = {"temperature": 1.0, "labels": labels, "topk_tail": "uniform"}
    loss = fused_linear_kl(hs, ws, teacher_topk=(idx, val), **kw)
    keep = labels != -100
    ref = fused_linear_kl(
        hs[keep], ws, teacher_topk=(idx[keep], val[keep]), **{**kw, "labels": None}
    )
    torch.testing.assert_close(loss, ref)
    idx[0, 2, 1] = idx[0, 2, 0]
    with pytest.raises(ValueError, match="distinct top-k indices .* twice in counted token 2"):
        fused_linear_kl(hs, ws, teacher_topk=(idx, val), **kw)


@pytest.mark.parametrize("side", ["left", "right"])
def test_rows_of_equal_length_in_another_order_are_refused(models_and_cache, side):
    """Two examples of the same length whose cache rows are swapped: the lengths agree, only
    the token ids the cache keeps can tell (it trained on the wrong teacher before)."""
    _, _, cache = models_and_cache
    g = torch.Generator().manual_seed(9)
    a, b = _examples()[0], dict(_examples()[0])
    b["input_ids"] = torch.randint(1, V, (len(a["input_ids"]),), generator=g)
    assert not torch.equal(a["input_ids"], b["input_ids"])
    b["cache_index"] = 0  # cache row 0 holds a's tokens
    collate = TopKCollator(_padding_collator(side), cache)
    collate([a])  # the right row: accepted
    with pytest.raises(
        TopKCacheError, match="example 0 of the batch \\(cache sequence 0\\) is not"
    ):
        collate([b])
    assert (cache.path / "tokens.bin").stat().st_size == 4 * cache.meta["tokens"]


def test_a_cache_without_token_ids_is_still_read(models_and_cache, tmp_path):
    """Caches written before the ids were kept: read, and checked by length alone."""
    import shutil

    _, _, cache = models_and_cache
    old = tmp_path / "old"
    shutil.copytree(cache.path, old)
    (old / "tokens.bin").unlink()
    meta = json.loads((old / "meta.json").read_text())
    del meta["token_ids"]
    (old / "meta.json").write_text(json.dumps(meta))
    collate = TopKCollator(_padding_collator("right"), TopKCache(old))
    assert collate(_examples())["teacher_topk_indices"].shape[0] == 4


def test_progress_false_draws_no_bar(tmp_path, capsys):
    ids = torch.randint(0, V, (2, 5))
    TopKCache.build(
        tmp_path / "c", [ids], k=3, logits_fn=lambda x: torch.randn(2, 5, V), progress=False
    )
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""


def test_a_negative_cache_index_counts_from_the_end(models_and_cache):
    """cache[-1] is the last sequence; the token-id check wrapped it too late (it crashed)."""
    _, _, cache = models_and_cache
    last = _examples()[-1]
    collate = TopKCollator(_padding_collator("right"), cache)
    got = collate([{**last, "cache_index": -1}])
    want = collate([{**last, "cache_index": len(cache) - 1}])
    assert torch.equal(got["teacher_topk_indices"], want["teacher_topk_indices"])
