"""Faults around a run directory: concurrent runs, re-runs, SIGKILL during saves, non-finite steps,
broken checkpoints, full disks, file modes. Tiny torch models, a few steps each; the subprocess tests run
the real `dsv3 train` command."""

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from dsv3 import ModelConfig
from dsv3.checkpoint import load_canonical
from dsv3.cli import main
from dsv3.data import load_corpus
from dsv3.fileio import atomic_write_bytes
from dsv3.rundir import RunDirError, RunLock, checkpoints, latest_checkpoint, load_train_state, read_metrics
from dsv3.train_config import TrainConfig
from dsv3.training import NonFiniteLoss, train

# The model of tests/test_train_backends.py (the tiny preset cut to two layers: one dense layer, one MoE
# layer and the MTP depth's MoE block): the JAX test below then runs the very program that module compiles
# (one entry of the run's XLA compilation cache), and the torch runs are shorter.
TINY = ModelConfig.preset("tiny").replace(vocab_size=256, bias_update_speed=1e-2, num_hidden_layers=2)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    """100 kB of the default corpus in one file (the processes below start without reading the default)."""
    c = load_corpus(max_bytes=100_000)
    p = tmp_path_factory.mktemp("faultdata") / "corpus.txt"
    p.write_bytes(np.concatenate([c.train, c.val]).tobytes())
    return str(p)


@pytest.fixture(scope="module")
def corpus(data_file):
    return load_corpus(data_file)


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory, data_file):
    d = tmp_path_factory.mktemp("tiny256faults")
    TINY.save_pretrained(str(d))
    return str(d), data_file


def _args(config, out, *extra, steps=6):
    config_dir, data = config
    return ["train", "--framework", "torch", "--config", config_dir, "--data", data, "--steps", str(steps),
            "--batch-size", "4",
            "--grad-accum", "2", "--seq-len", "32", "--lr", "3e-3", "--warmup-steps", "2", "--eval-every", "2",
            "--eval-batches", "1", "--save-every", "1", "--out", str(out), "--no-progress", "--no-plots", *extra]


def _strip(recs):
    return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "step_s")} for r in recs]


def _tcfg(config, out, **kw):
    config_dir, data = config
    base = dict(framework="torch", config=config_dir, data=data, steps=6, batch_size=4, grad_accum=2, seq_len=32, lr=3e-3,
                warmup_steps=2, eval_every=2, eval_batches=1, save_every=2, progress=False, plots=False, out=str(out))
    base.update(kw)
    return TrainConfig(**base)


def _torch_backend(cfg, tcfg):
    from dsv3_torch.train import make_backend

    return make_backend(cfg, tcfg)


def _all_finite_on_disk(out):
    for d in checkpoints(str(out)):
        _, state = load_canonical(d)
        assert all(np.isfinite(np.asarray(v, np.float32)).all() for v in state.values()), d


# ------------------------------------------------- real `dsv3 train` processes
# The child runs `dsv3.cli.main` after installing, from the environment:
#   DSV3_KILL_AT=k      SIGKILL itself at the k-th file event (fsync or rename) inside a checkpoint save,
#                       before the event or (DSV3_KILL_AFTER=1) just after it
#   DSV3_HOLD=path      wait before the first step until `path` exists (keeps the run alive meanwhile)
# With `--runs FILE` one launched process imports the command and torch once, then forks one child per
# run of FILE (a JSON list of {"args", "env", "log"}), in order, each a whole `dsv3 train` process of its
# own (SIGKILL ends only that child); it prints the children's exit statuses, as Popen.returncode gives
# them, as one JSON list.
_CHILD = r"""
import os, signal, sys, time

def install(env):
    import dsv3.training as tr

    kill_at = int(env.get("DSV3_KILL_AT", "0"))
    after = env.get("DSV3_KILL_AFTER") == "1"
    hold = env.get("DSV3_HOLD")
    state = {"n": 0, "in_save": False}

    def event(real):
        def f(*a, **k):
            if state["in_save"]:
                state["n"] += 1
                if state["n"] == kill_at and not after:
                    os.kill(os.getpid(), signal.SIGKILL)
            r = real(*a, **k)
            if state["in_save"] and state["n"] == kill_at and after:
                os.kill(os.getpid(), signal.SIGKILL)
            return r
        return f

    if kill_at:
        os.replace, os.fsync = event(os.replace), event(os.fsync)
        real_write = tr.write_checkpoint
        def write_checkpoint(*a, **k):
            state["in_save"] = True
            try:
                return real_write(*a, **k)
            finally:
                state["in_save"] = False
        tr.write_checkpoint = write_checkpoint

    if hold:
        real_step = tr._Run.step
        def step(self, s):
            while not os.path.exists(hold):
                time.sleep(0.05)
            return real_step(self, s)
        tr._Run.step = step

if sys.argv[1:2] != ["--runs"]:
    install(os.environ)
    from dsv3.cli import main
    sys.exit(main(sys.argv[1:]))

import json, traceback
from dsv3 import runtime
runtime.configure()  # as `dsv3` does, before torch is imported
from dsv3.cli import main
import dsv3.training, dsv3_torch.train  # noqa: F401,E401  (imported once, before the forks)
codes = []
for run in json.load(open(sys.argv[2])):
    sys.stdout.flush(); sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            fd = os.open(run["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1); os.dup2(fd, 2)
            os.environ.update(run["env"])
            install(os.environ)
            code = main(run["args"])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush(); sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    codes.append(-os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status))
print(json.dumps(codes))
"""


def _env(**env):
    return {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1",
            **{k: str(v) for k, v in env.items()}}


def _child(args, **env):
    return subprocess.Popen([sys.executable, "-c", _CHILD, *args], env=_env(**env), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _run_children(tmp_path, runs):
    """[(args, env)] run one after the other as forked `dsv3 train` processes of one launched process;
    [(returncode, stderr and stdout)] per run."""
    spec = [{"args": list(a), "env": {k: str(v) for k, v in e.items()}, "log": str(tmp_path / f"child{i}.log")}
            for i, (a, e) in enumerate(runs)]
    (tmp_path / "runs.json").write_text(json.dumps(spec))
    p = subprocess.run([sys.executable, "-c", _CHILD, "--runs", str(tmp_path / "runs.json")], env=_env(), cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    codes = json.loads(p.stdout.strip().splitlines()[-1])
    assert len(codes) == len(spec), p.stdout
    return [(rc, open(s["log"]).read()) for rc, s in zip(codes, spec)]


def test_second_run_on_same_out_is_refused_with_the_holders_pid(config_dir, tmp_path):
    """Two `dsv3 train` processes started together on one --out: one holds it (and waits, before its first
    step, until the other has given up), the other is refused at once with a message naming its pid."""
    out, go = tmp_path / "run", tmp_path / "go"
    procs = [_child(_args(config_dir, out, "--seed", str(seed), steps=4), DSV3_HOLD=go) for seed in (0, 1)]
    try:
        deadline = time.time() + 240
        while all(p.poll() is None for p in procs) and time.time() < deadline:
            time.sleep(0.05)
        losers = [p for p in procs if p.poll() is not None]
        assert len(losers) == 1, "neither run was refused"
        loser = losers[0]
        winner = procs[1] if loser is procs[0] else procs[0]
        _, err_b = loser.communicate()
        assert loser.returncode == 2 and f"pid {winner.pid}" in err_b and "in use by another run" in err_b, err_b
        assert "Traceback" not in err_b
        assert (out / ".lock").read_text().strip() == str(winner.pid)
    finally:
        go.write_text("")
    _, err_a = winner.communicate(timeout=300)
    assert winner.returncode == 0, err_a
    seed = procs.index(winner)
    recs = read_metrics(str(out / "metrics.jsonl"))
    assert [r["step"] for r in recs if r["kind"] == "train"] == [1, 2, 3, 4]  # the winner's records, whole
    assert [r["step"] for r in recs if r["kind"] == "eval"] == [2, 4]
    assert json.loads((out / "train_config.json").read_text())["seed"] == seed  # the winner's, not the other's
    for d in checkpoints(str(out)):
        load_canonical(d)
        assert load_train_state(d)[1]["seed"] == seed
    assert latest_checkpoint(str(out)).endswith("step_000004")
    # the lock is free again once the winner has ended
    with RunLock(str(out)):
        pass


@pytest.mark.slow
def test_sigkill_during_saves_then_resume_is_bit_exact(config_dir, tmp_path):
    ref = tmp_path / "ref"
    assert main(_args(config_dir, ref, steps=6)) == 0  # uninterrupted, in this process (one torch thread too)
    want = _strip(read_metrics(str(ref / "metrics.jsonl")))
    out = tmp_path / "killed"
    rng = random.Random(1234)
    # one save is 11 file events (config.json, model.safetensors, 2 train-state files: fsync + rename each;
    # the directory rename; `latest`: fsync + rename); the first kill comes after the first save
    kills = [(rng.randrange(12, 6 * 11), rng.random() < 0.5) for _ in range(3)]
    runs = [(_args(config_dir, out, steps=6) + (["--resume"] if i else []),
             {"DSV3_KILL_AT": k if i == 0 else 1 + k % 22, "DSV3_KILL_AFTER": int(after)})
            for i, (k, after) in enumerate(kills)]
    runs.append((["train", "--out", str(out), "--resume", "--no-progress"], {}))
    results = _run_children(tmp_path, runs)  # one launched process: the three killed runs, then the resume
    for rc, err in results[:-1]:
        assert rc in (-signal.SIGKILL, 0), err
    rc, err = results[-1]
    assert rc == 0, err
    got = _strip(read_metrics(str(out / "metrics.jsonl")))
    assert [r["loss"] for r in got if r["kind"] == "train"] == [r["loss"] for r in want if r["kind"] == "train"]
    assert got == want
    assert not [d for d in os.listdir(out) if d.startswith((".tmp-", ".old-"))]


# --------------------------------------------------------- in-process runs
def test_rerun_without_resume_is_refused_and_overwrite_starts_clean(config_dir, tmp_path, capsys):
    out = tmp_path / "run"
    old_mask = os.umask(0o022)
    try:
        assert main(_args(config_dir, out, steps=4)) == 0
        capsys.readouterr()
        before = {p: (out / p).read_bytes() for p in ("metrics.jsonl", "latest", "train_config.json")}
        listing = sorted(os.listdir(out))
        assert main(_args(config_dir, out, steps=2)) == 2
        err = capsys.readouterr().err
        assert "already holds a run" in err and "--resume" in err and "--overwrite" in err
        assert {p: (out / p).read_bytes() for p in before} == before and sorted(os.listdir(out)) == listing
        assert main(_args(config_dir, out, "--resume", "--overwrite", steps=2)) == 2
        assert "give one of them" in capsys.readouterr().err
        (out / "notes.txt").write_text("mine")  # not a run file: left alone
        assert main(_args(config_dir, out, "--overwrite", steps=2)) == 0
        recs = read_metrics(str(out / "metrics.jsonl"))
        assert [r["step"] for r in recs if r["kind"] == "train"] == [1, 2]
        assert sorted(d for d in os.listdir(out) if d.startswith("step_")) == ["step_000001", "step_000002"]
        assert latest_checkpoint(str(out)).endswith("step_000002") and (out / "notes.txt").read_text() == "mine"
        # files get the umask's mode (0644 under 022), model.safetensors included
        ck = latest_checkpoint(str(out))
        for p in [os.path.join(ck, f) for f in os.listdir(ck)] + [str(out / "metrics.jsonl"),
                                                                   str(out / "train_config.json"),
                                                                   str(out / "latest")]:
            assert os.stat(p).st_mode & 0o777 == 0o644, p
        os.umask(0o077)
        atomic_write_bytes(str(tmp_path / "private.bin"), b"x")
        assert os.stat(tmp_path / "private.bin").st_mode & 0o777 == 0o600
    finally:
        os.umask(old_mask)


def test_non_finite_step_is_not_applied_and_names_the_last_good_checkpoint(config_dir, tmp_path, corpus):
    """A NaN gradient injected at step 6: the weights stay those after step 5, the message names
    step_000004 (step 5's weights produced the NaN), no checkpoint on disk has non-finite weights, and
    --resume then reproduces the uninterrupted run."""
    ref = train(_tcfg(config_dir, tmp_path / "ref", steps=8), _torch_backend, corpus=corpus, quiet=True)
    assert ref.steps_done == 8
    seen = {}

    def poisoned(cfg, tcfg):
        b = _torch_backend(cfg, tcfg)
        clip, calls = b._clip, []

        def bad_clip():
            calls.append(1)
            if len(calls) == 6:
                seen["before"] = b.canonical_state()
                seen["opt_before"] = b.optimizer_state()
                next(p for p in b.model.parameters() if p.grad is not None).grad.view(-1)[0] = float("nan")
            return clip()

        b._clip = bad_clip
        seen["backend"] = b
        return b

    out = tmp_path / "nan"
    with pytest.raises(NonFiniteLoss, match=r"non-finite loss at step 6 .*grad_norm': nan.*not applied.*"
                                            r"last good checkpoint .* is .*step_000004\. Try a lower --lr"):
        train(_tcfg(config_dir, out, steps=8, save_every=1, keep_checkpoints=3), poisoned, corpus=corpus, quiet=True)
    b = seen["backend"]
    after, opt_after = b.canonical_state(), b.optimizer_state()
    assert all(np.array_equal(after[k], seen["before"][k]) for k in after)  # weights and router biases
    assert all(np.array_equal(opt_after[k], seen["opt_before"][k]) for k in opt_after)
    _all_finite_on_disk(out)
    _, meta5 = load_train_state(str(out / "step_000005"))
    assert meta5["non_finite_next_step"] == 6
    res = train(_tcfg(config_dir, out, steps=8, save_every=1, keep_checkpoints=3), _torch_backend, resume=True,
                corpus=corpus, quiet=True)
    assert res.resumed_from.endswith("step_000004")
    assert [(os.path.basename(d), why) for d, why in res.skipped_checkpoints] == [
        ("step_000005", "the step after it (step 6) had a non-finite loss")]
    want = _strip(read_metrics(str(tmp_path / "ref" / "metrics.jsonl")))
    assert _strip(read_metrics(str(out / "metrics.jsonl"))) == want


@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_backend_leaves_state_unchanged_on_non_finite_step(framework, config_dir, corpus):
    from dsv3.data import BatchSampler
    from dsv3.train_config import model_config

    if framework == "jax":
        pytest.importorskip("dsv3_jax.train")
        from dsv3_jax.train import make_backend
    else:
        from dsv3_torch.train import make_backend
    # the model, shapes and hyper-parameters of tests/test_train_backends.py (one compiled JAX step for both)
    t = TrainConfig(framework=framework, config=config_dir[0], steps=6, batch_size=8, grad_accum=4, seq_len=32,
                    lr=3e-3, warmup_steps=2, eps=1e-3, eval_every=3, eval_batches=2, save_every=3, progress=False,
                    plots=False, out="unused")
    b = make_backend(model_config(t), t)
    sampler = BatchSampler(corpus.train, 32, seed=0)
    micro = lambda s: [sampler.batch(s * 8 + j * 2, 2) for j in range(4)]  # noqa: E731
    first = b.train_step(micro(0), 1e9)  # finite step: the weights jump to ~1e9
    assert np.isfinite(first["loss"]) and np.isfinite(first["grad_norm"])
    s0, o0 = b.canonical_state(), b.optimizer_state()
    res = b.train_step(micro(1), 1e9)
    assert not (np.isfinite(res["loss"]) and np.isfinite(res["grad_norm"]))
    s1, o1 = b.canonical_state(), b.optimizer_state()
    assert set(s1) == set(s0) and all(np.array_equal(s1[k], s0[k]) for k in s0)  # biases included
    assert set(o1) == set(o0) and all(np.array_equal(o1[k], o0[k]) for k in o0)  # moments and step count


def test_resume_falls_back_past_a_truncated_latest_checkpoint(config_dir, tmp_path, corpus, capsys):
    train(_tcfg(config_dir, tmp_path / "ref"), _torch_backend, corpus=corpus, quiet=True)
    want = _strip(read_metrics(str(tmp_path / "ref" / "metrics.jsonl")))
    out = tmp_path / "run"
    shutil.copytree(tmp_path / "ref", out)
    (out / ".lock").unlink()
    latest = latest_checkpoint(str(out))
    assert latest.endswith("step_000006")
    model = os.path.join(latest, "model.safetensors")
    with open(model, "r+b") as f:
        f.truncate(os.path.getsize(model) // 2)
    res = train(_tcfg(config_dir, out), _torch_backend, resume=True, corpus=corpus)
    err = capsys.readouterr().err
    assert res.resumed_from.endswith("step_000004") and "skipping" in err and "step_000006" in err
    assert "model unreadable" in err and "resumed from" in err
    assert _strip(read_metrics(str(out / "metrics.jsonl"))) == want
    assert [os.path.basename(d) for d in checkpoints(str(out))] == ["step_000006", "step_000004"]
    _, state = load_canonical(latest_checkpoint(str(out)))  # step 6 written anew
    _, ref_state = load_canonical(latest_checkpoint(str(tmp_path / "ref")))
    assert all(np.array_equal(state[k], ref_state[k]) for k in ref_state)
    # every checkpoint broken: refused, with the reasons
    for d in checkpoints(str(out)):
        with open(os.path.join(d, "train_state.json"), "w") as f:
            f.write("{")
    with pytest.raises(FileNotFoundError, match="no intact checkpoint.*train state unreadable"):
        train(_tcfg(config_dir, out), _torch_backend, resume=True, corpus=corpus, quiet=True)


def test_disk_full_during_save_is_a_clear_error_and_keeps_the_previous_checkpoint(config_dir, tmp_path,
                                                                                    monkeypatch, capsys):
    import dsv3.training as tr

    real_write, real_fsync, saves = tr.write_checkpoint, os.fsync, []

    def full_fsync(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    def write_checkpoint(*a, **k):
        saves.append(1)
        if len(saves) == 3:  # the third save runs out of space half-way
            monkeypatch.setattr(os, "fsync", full_fsync)
        try:
            return real_write(*a, **k)
        finally:
            monkeypatch.setattr(os, "fsync", real_fsync)

    monkeypatch.setattr(tr, "write_checkpoint", write_checkpoint)
    out = tmp_path / "run"
    assert main(_args(config_dir, out, steps=4)) == 1
    err = capsys.readouterr().err
    assert "no space left on the device while writing checkpoint step_000003" in err
    assert os.path.abspath(out) in err and "step_000002 is intact" in err and "Traceback" not in err
    assert latest_checkpoint(str(out)).endswith("step_000002")
    load_canonical(latest_checkpoint(str(out)))
    load_train_state(latest_checkpoint(str(out)))
    assert not [d for d in os.listdir(out) if d.startswith((".tmp-", ".old-"))]
    assert not [f for d in checkpoints(str(out)) for f in os.listdir(d) if f.startswith(".tmp-")]
    monkeypatch.setattr(tr, "write_checkpoint", real_write)
    assert main(["train", "--out", str(out), "--resume", "--no-progress"]) == 0  # space is back: continue
    assert [r["step"] for r in read_metrics(str(out / "metrics.jsonl")) if r["kind"] == "train"] == [1, 2, 3, 4]


def test_lock_is_exclusive_in_process(tmp_path):
    with RunLock(str(tmp_path)):
        assert (tmp_path / ".lock").read_text().strip() == str(os.getpid())
        with pytest.raises(RunDirError, match=f"pid {os.getpid()}"):
            RunLock(str(tmp_path)).acquire()
    RunLock(str(tmp_path)).acquire().release()
