"""ClassPrior (GI) against hand-computed class means, and across two gloo processes."""

from __future__ import annotations

import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dkl import ClassPrior


def _softmax_rows(rows, T=1.0):
    return torch.tensor(rows, dtype=torch.float64).div(T).softmax(dim=1)


def test_rows_are_class_means_of_the_previous_epoch():
    logits = [[1.0, 0.0, 0.0], [0.0, 3.0, 0.0], [2.0, 1.0, 0.0], [0.0, 0.0, 5.0]]
    labels = torch.tensor([0, 1, 0, 2])
    prior = ClassPrior(3, temperature=2.0)
    prior.update(torch.tensor(logits[:2]), labels[:2])
    prior.update(torch.tensor(logits[2:]), labels[2:])
    # nothing changes before the end of the epoch
    torch.testing.assert_close(prior.prior, torch.full((3, 3), 1 / 3))
    prior.step()
    p = _softmax_rows(logits, T=2.0).float()
    torch.testing.assert_close(prior.prior[0], (p[0] + p[2]) / 2)
    torch.testing.assert_close(prior.prior[1], p[1])
    torch.testing.assert_close(prior.prior[2], p[3])
    torch.testing.assert_close(
        prior.weights(torch.tensor([2, 0])), torch.stack([p[3], (p[0] + p[2]) / 2])
    )
    assert prior.counts.sum() == 0 and prior.sums.abs().sum() == 0  # reset for the next epoch


def test_momentum_blends_with_the_old_row():
    prior = ClassPrior(2, momentum=0.25)
    prior.update(torch.tensor([[2.0, 0.0]]), torch.tensor([0]))
    prior.step()
    p = _softmax_rows([[2.0, 0.0]]).float()[0]
    torch.testing.assert_close(prior.prior[0], 0.25 * p + 0.75 * torch.tensor([0.5, 0.5]))
    torch.testing.assert_close(prior.prior[1], torch.tensor([0.5, 0.5]))


def test_unseen_classes_keep_their_previous_row():
    prior = ClassPrior(3)
    prior.update(torch.tensor([[3.0, 0.0, 0.0], [0.0, 0.0, 3.0]]), torch.tensor([0, 2]))
    prior.step()
    row2 = prior.prior[2].clone()
    prior.update(torch.tensor([[0.0, 1.0, 0.0]]), torch.tensor([0]))
    prior.step()
    torch.testing.assert_close(prior.prior[2], row2)
    torch.testing.assert_close(prior.prior[1], torch.full((3,), 1 / 3))
    assert torch.isfinite(prior.prior).all()


def test_state_dict_round_trip_mid_epoch_resumes_exactly():
    g = torch.Generator().manual_seed(0)
    batches = [
        (torch.randn(8, 5, generator=g), torch.randint(0, 5, (8,), generator=g)) for _ in range(6)
    ]
    straight = ClassPrior(5, temperature=4.0)
    for x, y in batches:
        straight.update(x, y)
    straight.step()

    first = ClassPrior(5, temperature=4.0)
    for x, y in batches[:3]:
        first.update(x, y)
    state = {k: v.clone() for k, v in first.state_dict().items()}
    resumed = ClassPrior(5, temperature=4.0)
    resumed.load_state_dict(state)
    for x, y in batches[3:]:
        resumed.update(x, y)
    resumed.step()
    assert torch.equal(resumed.prior, straight.prior)


def test_errors():
    with pytest.raises(ValueError, match=r"Expected num_classes >= 2, got 1"):
        ClassPrior(1)
    prior = ClassPrior(4)
    with pytest.raises(ValueError, match=r"Expected labels in \[0, 4\), got values in \[0, 7\]"):
        prior.update(torch.zeros(2, 4), torch.tensor([0, 7]))
    with pytest.raises(ValueError, match=r"Expected labels in \[0, 4\), got values in \[-1, 2\]"):
        prior.weights(torch.tensor([-1, 2]))
    with pytest.raises(TypeError, match=r"Expected integer class labels, got torch.float32"):
        prior.update(torch.zeros(2, 4), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"Expected target_logits with C = 4 classes, got 3"):
        prior.update(torch.zeros(2, 3), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"Expected labels of shape \(B,\) = \(2,\), got \(3,\)"):
        prior.update(torch.zeros(2, 4), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"Expected momentum in \(0, 1\]"):
        ClassPrior(3, momentum=0.0)
    nan = torch.zeros(2, 4)
    nan[0, 0] = float("nan")
    prior.update(nan, torch.tensor([0, 1]))
    with pytest.raises(FloatingPointError, match=r"non-finite values in the class means"):
        prior.step()
    state = ClassPrior(4).state_dict()
    state["prior"][0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"non-finite values in 'prior'"):
        ClassPrior(4).load_state_dict(state)
    with pytest.raises(ValueError, match=r"Expected a prior of shape \(3, 3\), got \(4, 4\)"):
        ClassPrior(3).load_state_dict(ClassPrior(4).state_dict())
    state = ClassPrior(4).state_dict()
    state["prior"][1, 2] = -0.5
    with pytest.raises(ValueError, match=r"negative values in 'prior' .*, down to -0.5"):
        ClassPrior(4).load_state_dict(state)
    with pytest.raises(TypeError, match=r"Expected num_classes an integer >= 2, got 3.0"):
        ClassPrior(3.0)
    assert ClassPrior(np.int64(10)).num_classes == 10  # a NumPy integer is an integer


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_a_cast_module_keeps_float64_running_sums(dtype):
    """A model holding a prior cast with ``.half()`` / ``.to(bfloat16)``: the running sums and
    counts stay float64 (update raised a dtype error, and float16 counts stop at 2048), so the
    prior equals the class means computed by hand; the prior itself takes the dtype."""
    prior = ClassPrior(3).to(dtype)
    assert prior.prior.dtype == dtype
    assert prior.sums.dtype == prior.counts.dtype == torch.float64
    logits = torch.randn(3000, 3, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(3000) % 3
    prior.update(logits.to(dtype), labels)
    assert prior.counts.tolist() == [1000.0, 1000.0, 1000.0]
    probs = torch.softmax(logits.to(dtype).double(), 1)
    want = torch.stack([probs[labels == c].mean(0) for c in range(3)])
    prior.step()
    torch.testing.assert_close(prior.prior.double(), want.to(dtype).double())


def test_neg_inf_logits_are_zero_probability_classes_and_empty_batches_are_no_ops():
    prior = ClassPrior(3)
    prior.update(torch.tensor([[float("-inf"), 1.0, 0.0], [2.0, 0.0, 0.0]]), torch.tensor([0, 0]))
    prior.update(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))
    prior.step()
    e = torch.e
    row0 = torch.tensor([0.0, e / (e + 1), 1 / (e + 1)])  # class 0 ruled out
    row1 = torch.tensor([e**2, 1.0, 1.0]) / (e**2 + 2)
    torch.testing.assert_close(prior.prior[0], (row0 + row1) / 2)
    torch.testing.assert_close(prior.prior[1], torch.full((3,), 1 / 3))
    # a row the target rules out entirely is no distribution: step() refuses it
    prior.update(torch.full((1, 3), float("-inf")), torch.tensor([2]))
    with pytest.raises(FloatingPointError, match=r"non-finite values in the class means"):
        prior.step()


def test_running_state_round_trip():
    prior = ClassPrior(3)
    prior.update(torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]]), torch.tensor([0, 2]))
    part = prior.running_state()
    other = ClassPrior(3)
    other.load_running_state(part)
    assert torch.equal(other.sums, prior.sums) and torch.equal(other.counts, prior.counts)
    assert other.counts.tolist() == [1.0, 0.0, 1.0]
    part["sums"][0, 0] = 99.0  # a copy, not a view of the buffers
    assert prior.sums[0, 0] != 99.0
    with pytest.raises(ValueError, match=r"running sums of shape \(3, 3\), got \(4, 4\)"):
        other.load_running_state(ClassPrior(4).running_state())


# --------------------------------------------------------------------------- two gloo ranks
def _data():
    g = torch.Generator().manual_seed(42)
    return torch.randn(40, 6, generator=g) * 3, torch.randint(0, 5, (40,), generator=g)


def _rank_main(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        x, y = _data()
        prior = ClassPrior(6, temperature=4.0)
        # each rank sees its own shard, class 5 on neither: it must stay uniform
        prior.update(x[rank::world], y[rank::world])
        prior.step()
        torch.save(prior.prior, os.path.join(out_dir, f"prior{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_gloo_all_reduce(tmp_path):
    mp.spawn(_rank_main, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    p0 = torch.load(tmp_path / "prior0.pt", weights_only=True)
    p1 = torch.load(tmp_path / "prior1.pt", weights_only=True)
    assert torch.equal(p0, p1)
    single = ClassPrior(6, temperature=4.0)
    x, y = _data()
    single.update(x, y)
    single.step()
    torch.testing.assert_close(p0, single.prior, rtol=0, atol=1e-7)
    torch.testing.assert_close(p0[5], torch.full((6,), 1 / 6))
