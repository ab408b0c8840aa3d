"""The trainer: improvement, exact resume after SIGTERM, torchrun, outputs, errors."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from dkl.api import make_trainer, train
from dkl.config import load_config
from dkl.train import CHECKPOINT_FORMAT, NonFiniteLossError, load_checkpoint

REPO = Path(__file__).resolve().parents[1]
QUIET = ["train.progress=false", "train.plot=false", "train.threads=1"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    """A digits teacher trained for 2 epochs (enough to be far better than chance)."""
    out = tmp_path_factory.mktemp("teacher")
    cfg = load_config("kd/digits_teacher", [f"train.out_dir={out}", "train.epochs=2", *QUIET])
    s = train(cfg, log=lambda m: None)
    assert s["last"]["top1"] > 50
    return out / cfg.name / "best.pt"


def _records(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        r.pop("time")
    return rows


def test_one_epoch_improves_accuracy(tmp_path):
    cfg = load_config("kd/digits_ce", [f"train.out_dir={tmp_path}", "train.epochs=1", *QUIET])
    trainer = make_trainer(cfg, log=lambda m: None)
    before = trainer.evaluate()["top1"]
    summary = trainer.fit()
    after = summary["last"]["top1"]
    assert before < 30  # an untrained 10-class model is near chance
    assert after > before + 40
    run = tmp_path / cfg.name
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "last.pt", "best.pt", "final.pt"):
        assert (run / name).is_file(), name
    s = json.loads((run / "summary.json").read_text())
    assert s["global_batch_size"] == 64 and s["world_size"] == 1
    assert s["throughput_samples_per_s"] > 0 and s["wall_time_s"] > 0
    # the resolved config reloads to the same run
    again = load_config(run / "config.yaml")
    assert again.model == cfg.model and again.distill == cfg.distill


def test_outputs_plot_and_existing_run(tmp_path):
    cfg = load_config(
        "kd/digits_ce",
        [f"train.out_dir={tmp_path}", "train.epochs=2", "train.progress=false", "train.threads=1"],
    )
    train(cfg, log=lambda m: None)
    assert (tmp_path / cfg.name / "curves.png").stat().st_size > 1000
    with pytest.raises(FileExistsError, match="--resume"):
        train(cfg, log=lambda m: None)


def test_non_finite_loss_stops_the_run(tmp_path, teacher):
    cfg = load_config(
        "kd/digits_ikl",
        [
            f"train.out_dir={tmp_path}",
            f"distill.teacher.checkpoint={teacher}",
            "distill.beta=1e8",
            "distill.warmup=0",
            "optim.lr=50",
            *QUIET,
        ],
    )
    with pytest.raises(NonFiniteLossError, match=r"diverged at epoch 1, "):
        train(cfg, log=lambda m: None)


def test_iteration_based_training(tmp_path):
    cfg = load_config(
        "kd/digits_ce",
        [
            f"train.out_dir={tmp_path}",
            "train.iterations=50",
            "train.eval_every=20",
            "sched.name=constant",
            *QUIET,
        ],
    )
    s = train(cfg, log=lambda m: None)
    rows = _records(tmp_path / cfg.name)
    # 22 steps per data epoch: evaluations at 20, 40 and the end (50)
    assert [r["step"] for r in rows] == [20, 40, 50]
    assert s["steps"] == 50


def test_checkpoint_is_weights_only_and_complete(tmp_path, teacher):
    cfg = load_config(
        "kd/digits_ikl",
        [
            f"train.out_dir={tmp_path}",
            f"distill.teacher.checkpoint={teacher}",
            "distill.gi=true",
            "train.epochs=1",
            *QUIET,
        ],
    )
    train(cfg, log=lambda m: None)
    ck = torch.load(tmp_path / cfg.name / "last.pt", weights_only=True)
    want = {"model", "optimizer", "scheduler", "scaler", "recipe", "engine", "rng", "config"}
    assert set(ck) >= want
    assert ck["format"] == CHECKPOINT_FORMAT == "dkl-checkpoint-2"
    # the lr schedule has stepped after each of the epoch's 22 optimiser steps
    assert ck["scheduler"]["last_epoch"] == 22
    prior = ck["recipe"]["prior"]
    assert set(prior) >= {"prior", "sums", "counts"}
    # the prior was stepped once: rows are teacher means, no longer uniform
    assert not torch.allclose(prior["prior"], torch.full_like(prior["prior"], 0.1))
    assert {"torch", "numpy", "python"} <= set(ck["rng"])
    assert ck["engine"]["epoch"] == 2 and ck["engine"]["step_in_epoch"] == 0


_SLOW_STEPS = textwrap.dedent(
    """
    import os, sys, time
    from dkl.recipes import distill
    _step = distill.DistillTask.train_step
    _done = [0]
    def slow(self, batch, ctx):  # numerics untouched; only gives the test time to signal
        time.sleep(0.03)
        out = _step(self, batch, ctx)
        _done[0] += 1  # steps taken so far, for the test to signal at a known point
        with open(os.environ["DKL_TEST_STEPS"], "w") as f:
            f.write(str(_done[0]))
        return out
    distill.DistillTask.train_step = slow
    from dkl.cli import main
    sys.exit(main(sys.argv[1:]))
    """
)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_resume_after_signal_equals_uninterrupted(tmp_path, teacher, sig):
    args = [
        "kd/digits_ikl",
        f"distill.teacher.checkpoint={teacher}",
        "distill.gi=true",
        "train.epochs=3",
        "distill.warmup=2",
        *QUIET,
    ]
    # uninterrupted reference, in process
    ref_cfg = load_config(args[0], [*args[1:], f"train.out_dir={tmp_path / 'ref'}"])
    ref = train(ref_cfg, log=lambda m: None)

    out = tmp_path / "cut"
    cmd = [sys.executable, "-c", _SLOW_STEPS, "train", *args, f"train.out_dir={out}"]
    steps = tmp_path / "steps.txt"
    env = {**_clean_env(), "DKL_TEST_STEPS": str(steps)}
    proc = subprocess.Popen(
        cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )

    def taken() -> int:
        try:
            return int(steps.read_text() or 0)
        except (FileNotFoundError, ValueError):  # not written yet, or caught mid-write
            return 0

    deadline = time.time() + 120
    while taken() < 22 + 5 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(sig)  # ~5 of epoch 2's 22 steps (>= 30 ms each) done: mid-epoch
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + int(sig), err
    assert "--resume" in err
    ck = load_checkpoint(out / ref_cfg.name / "last.pt")
    assert ck["engine"]["epoch"] == 2 and 0 < ck["engine"]["step_in_epoch"] < 22, ck["engine"]

    cut_cfg = load_config(args[0], [*args[1:], f"train.out_dir={out}"])
    resumed = train(cut_cfg, resume=True, log=lambda m: None)

    assert resumed["last"] == ref["last"] and resumed["best"] == ref["best"]
    assert _records(out / ref_cfg.name) == _records(tmp_path / "ref" / ref_cfg.name)
    a = torch.load(out / ref_cfg.name / "final.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "ref" / ref_cfg.name / "final.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in b)
    pa = torch.load(out / ref_cfg.name / "last.pt", weights_only=True)["recipe"]["prior"]
    pb = torch.load(tmp_path / "ref" / ref_cfg.name / "last.pt", weights_only=True)["recipe"][
        "prior"
    ]
    assert all(torch.equal(pa[k], pb[k]) for k in pb)


def test_resume_with_fewer_ranks_keeps_the_running_sums(tmp_path):
    """A checkpoint written by 2 ranks, resumed by 1: the epoch's running sums are merged, the
    per-step ones (loss, extras, steps) as one rank's: 2 steps of mean loss (1 + 3) / 4 = 1.0
    each, which the uninterrupted epoch would count as 2 of its steps, not 4."""
    cfg = load_config("kd/digits_ce", [f"train.out_dir={tmp_path}", "train.epochs=1", *QUIET])
    trainer = make_trainer(cfg, log=lambda m: None)
    trainer.scheduler = trainer.task.build_scheduler(trainer.optimizer, 22)  # fit() builds it
    state = trainer.state_dict()

    def part(loss: float, seen: int) -> dict:
        running = {"loss": loss, "correct": 1, "seen": seen, "steps": 2, "extra": {"ce": 0.5}}
        return {"rng": state["rng"], "running": running, "recipe": {}}

    state["ranks"] = [part(1.0, 10), part(3.0, 20)]
    logs: list[str] = []
    trainer = make_trainer(cfg, log=logs.append)
    trainer.scheduler = trainer.task.build_scheduler(trainer.optimizer, 22)
    trainer.load_state_dict(state)
    assert trainer.running.sums == {
        "loss": 2.0,
        "correct": 2,
        "seen": 30,
        "steps": 2,
        "extra": {"ce": 0.5},
    }
    assert "written by 2 rank(s), this run has 1" in logs[-1]


def _clean_env() -> dict:
    """This process's environment minus what other tests or launchers may have left in it."""
    drop = {
        "MASTER_ADDR",
        "MASTER_PORT",
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "LOCAL_WORLD_SIZE",
        "GROUP_RANK",
        "TORCHELASTIC_RUN_ID",
    }
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONFAULTHANDLER"] = "1"  # a worker that aborts prints where it was
    return env


_TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone"]
# --standalone: rendezvous on a free port chosen by torchrun itself


def _ddp_args(teacher: Path, out: Path) -> list[str]:
    return [
        "train",
        "kd/digits_ikl",
        f"distill.teacher.checkpoint={teacher}",
        "distill.gi=true",
        "train.epochs=2",
        "train.device=cpu",
        f"train.out_dir={out}",
        *QUIET,
    ]


def _torchrun(args: list[str]) -> subprocess.CompletedProcess:
    res = subprocess.run(
        [*_TORCHRUN, "-m", "dkl", *args],
        check=False,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
        env=_clean_env(),
    )
    if res.returncode != 0:  # show the workers' errors, not the warnings
        lines = [ln for ln in res.stderr.splitlines() if not ln.startswith("[W")]
        out_tail = "\n".join(res.stdout.splitlines()[-15:])
        pytest.fail(f"torchrun failed:\n{out_tail}\n" + "\n".join(lines[-80:]))
    return res


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, teacher) -> tuple[Path, subprocess.CompletedProcess]:
    """An uninterrupted 2-rank gloo run of kd/digits_ikl with GI, 2 epochs."""
    out = tmp_path_factory.mktemp("ddp")
    return out / "digits_ikl", _torchrun(_ddp_args(teacher, out))


def test_torchrun_two_processes_gloo(ddp_run):
    run, res = ddp_run
    s = json.loads((run / "summary.json").read_text())
    assert s["world_size"] == 2 and s["global_batch_size"] == 64
    # weights and the class prior (sums all-reduced, then stepped) are identical on both ranks
    assert s["rank_sync"]["params_max_abs_diff"] == 0.0
    assert s["rank_sync"]["prior_max_abs_diff"] == 0.0
    ck = torch.load(run / "last.pt", weights_only=True)
    prior = ck["recipe"]["prior"]["prior"]
    assert torch.allclose(prior.sum(1), torch.ones(10, dtype=prior.dtype), atol=1e-5)
    # every rank's RNG state is in the checkpoint, and the ranks draw different streams
    r0, r1 = (part["rng"] for part in ck["ranks"])
    assert torch.equal(r0["torch"], ck["rng"]["torch"])
    assert not torch.equal(r0["torch"], r1["torch"])
    assert len(_records(run)) == 2
    assert "global_batch=64 (32/rank)" in res.stdout


def test_torchrun_preempted_then_resumed_equals_uninterrupted(tmp_path, teacher, ddp_run):
    """SIGTERM to torchrun mid-epoch (a preempted job), then --resume: same run as never stopped."""
    ref, _ = ddp_run
    out = tmp_path / "cut"
    script = tmp_path / "slow_dkl.py"
    script.write_text(_SLOW_STEPS)
    steps = tmp_path / "steps.txt"
    env = {**_clean_env(), "DKL_TEST_STEPS": str(steps)}
    proc = subprocess.Popen(
        [*_TORCHRUN, str(script), *_ddp_args(teacher, out)],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )

    def taken() -> int:
        try:
            return int(steps.read_text() or 0)
        except (FileNotFoundError, ValueError):
            return 0

    deadline = time.time() + 150
    while taken() < 22 + 5 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)  # torchrun passes it on to both workers
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0, "the preempted run should not report success"
    ck = load_checkpoint(out / "digits_ikl" / "last.pt")
    assert ck["engine"]["epoch"] == 2 and 0 < ck["engine"]["step_in_epoch"] < 22, (
        ck["engine"],
        err[-3000:],
    )
    assert len(ck["ranks"]) == 2

    _torchrun([*_ddp_args(teacher, out), "--resume"])
    assert _records(out / "digits_ikl") == _records(ref)
    a = torch.load(out / "digits_ikl" / "final.pt", weights_only=True)["model"]
    b = torch.load(ref / "final.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in b)
    # each rank got its own half-epoch prior sums back, so epoch 2's all-reduced prior matches
    pa = load_checkpoint(out / "digits_ikl" / "last.pt")["recipe"]["prior"]["prior"]
    pb = load_checkpoint(ref / "last.pt")["recipe"]["prior"]["prior"]
    assert torch.equal(pa, pb)


def test_torchrun_metrics_are_those_of_the_saved_model(tmp_path):
    """2 ranks, a model with BatchNorm, the adversarial recipe's PGD-10 metric on the test
    split's first 101 points: every logged test number is what one process measures on
    final.pt, the PGD one attacking each point alone. Each rank evaluated its own BatchNorm
    statistics, the PGD metric was rank 0's shard alone, and then every rank drew the same
    random starts for its own points (78.0 on 2 ranks where one process measured 78.5)."""
    from dkl.api import load_run
    from dkl.attacks import pgd_attack
    from dkl.data.seeding import mix_seed
    from dkl.recipes.adversarial import _PGD_STARTS
    from dkl.train.metrics import evaluate_classifier

    _torchrun(
        [
            "train",
            "adversarial/digits_ikl_at",
            "model.name=digits_cnn",
            "model.kwargs={width: 4}",
            "adversarial.attack.eps=0.1",
            "adversarial.eval.pgd_examples=101",
            "train.epochs=1",
            "train.max_steps_per_epoch=3",
            "train.device=cpu",
            f"train.out_dir={tmp_path}",
            *QUIET,
        ]
    )
    run = tmp_path / "digits_ikl_at"
    logged = _records(run)[-1]
    s = json.loads((run / "summary.json").read_text())
    assert s["world_size"] == 2 and s["rank_sync"]["buffers_max_abs_diff"] == 0.0
    trainer, model = load_run(run / "final.pt", [])
    got = evaluate_classifier(model, trainer.ctx.test_loader(), torch.device("cpu"))
    assert logged["top1"] == pytest.approx(got["top1"])
    assert logged["test_loss"] == pytest.approx(got["test_loss"], rel=1e-5)
    seed, correct = trainer.cfg.seed, 0
    for i in range(101):
        x, y = trainer.ctx.test_set[i]
        x, y = x[None], torch.tensor([int(y)])
        start = torch.Generator().manual_seed(mix_seed(seed, _PGD_STARTS, i))
        x_adv = pgd_attack(model.eval(), x, y, eps=0.1, steps=10, generator=[start])
        with torch.no_grad():
            correct += int(model(x_adv).argmax(1) == y)
    assert logged["pgd10"] == pytest.approx(100.0 * correct / 101)
    assert logged["pgd10"] < logged["top1"]  # the attack moved something


def test_ranks_launched_with_other_settings_are_refused(tmp_path, teacher):
    """Each node of a multi-node job types its own command: a rank with its own seed trained
    silently (rank 0's weights, but each rank's data order and labeled subset: 26 of 100 samples
    seen twice in an epoch). Every rank now refuses, naming the setting; paths may differ."""
    script = tmp_path / "per_rank.py"
    script.write_text(
        "import os, sys\nfrom dkl.cli import main\n"
        "rank = int(os.environ['RANK'])\n"
        "sys.exit(main(sys.argv[1:] + [f'seed={rank}', f'data.root=/data/node{rank}']))\n"
    )
    res = subprocess.run(
        [*_TORCHRUN, str(script), *_ddp_args(teacher, tmp_path / "out")],
        check=False, cwd=REPO, capture_output=True, text=True, timeout=180, env=_clean_env(),
    )  # fmt: skip
    assert res.returncode != 0
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("dkl: error:")]
    assert errors and all("launched with other settings" in ln for ln in errors), res.stderr[-2000:]
    assert any("seed = 1 there, 0 here" in ln or "seed = 0 there, 1 here" in ln for ln in errors)
    assert not any("data.root" in ln for ln in errors)  # a path may differ per machine
    assert not (tmp_path / "out" / "digits_ikl" / "last.pt").exists()


def test_a_hung_rank_stops_the_others_after_train_dist_timeout(tmp_path, teacher):
    """A rank that stops answering (SIGSTOP: a hung GPU, a stalled node) left the others waiting
    silently for torch's 30 minutes. train.dist_timeout sets the wait; the rank that gave up says
    in one line what happened and how to go on."""
    script = tmp_path / "slow_dkl.py"
    script.write_text(_SLOW_STEPS)
    steps = tmp_path / "steps.txt"
    env = {**_clean_env(), "DKL_TEST_STEPS": str(steps)}
    args = [*_ddp_args(teacher, tmp_path / "out"), "train.dist_timeout=0.1"]
    proc = subprocess.Popen(
        [*_TORCHRUN, str(script), *args],
        env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if steps.exists() and steps.read_text().strip() not in ("", "0", "1", "2"):
            break
        time.sleep(0.02)
    found = subprocess.run(
        ["pgrep", "-f", str(script)], check=False, capture_output=True, text=True
    )
    workers = [int(p) for p in found.stdout.split() if int(p) != proc.pid]
    rank1 = [p for p in workers if b"RANK=1\0" in Path(f"/proc/{p}/environ").read_bytes()]
    assert rank1, workers
    os.kill(rank1[0], signal.SIGSTOP)
    try:
        _, err = proc.communicate(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):  # torchrun may have killed it already
            os.kill(rank1[0], signal.SIGCONT)
        proc.kill()
    lost = [ln for ln in err.splitlines() if ln.startswith("dkl: error: lost contact")]
    assert lost and "--resume" in lost[0], err[-3000:]
