"""Training on the standard-library corpus, checkpoints, sampling, the CLI; the corpus and synthetic tasks."""

import json
import re

import pytest
import torch

from subquad.data import IGNORE, load_corpus, mqar, needle, random_windows, stdlib_files, stdlib_root
from subquad.train import TrainConfig, generate_text, load_checkpoint, lr_at, save_checkpoint, train


@pytest.fixture(scope="module")
def corpus():
    return load_corpus(max_bytes=600_000)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus):
    out = tmp_path_factory.mktemp("run")
    cfg = TrainConfig(layers="MA", d_model=32, seq_len=64, batch_size=8, steps=30, warmup=5, eval_every=15,
                      eval_batches=2, out=str(out))
    return cfg, train(cfg, progress=False, corpus=corpus)


def test_thirty_steps_lower_the_loss_and_write_the_outputs(trained):
    cfg, result = trained
    losses = result.history["loss"]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < losses[0] - 1.0  # from ~ln(256) = 5.5 nats
    assert result.history["val_step"] == [15, 30]
    assert result.history["val_bpb"][-1] < result.history["val_bpb"][0] < 8.5
    assert result.tokens_per_s > 0
    for name in ("checkpoint.pt", "loss.png", "history.json"):
        assert (torch.serialization.os.path.exists(f"{cfg.out}/{name}"))
    saved = json.loads(open(f"{cfg.out}/history.json").read())
    assert saved["config"]["layers"] == "MA" and saved["final_val_bpb"] == result.final_val_bpb


def test_checkpoint_round_trip_and_sampling(trained):
    cfg, result = trained
    model, ckpt = load_checkpoint(result.checkpoint)
    assert ckpt["train_config"]["steps"] == 30 and model.layer_letters == "MA"
    ids = torch.randint(0, 256, (1, 20))
    again, _ = load_checkpoint(result.checkpoint)
    torch.testing.assert_close(model(ids), again(ids))
    text = generate_text(result.checkpoint, "def f(", max_new_tokens=20, temperature=0.8, top_k=20, device="cpu")
    assert text.startswith("def f(") and len(text.encode()) >= 20
    greedy = [generate_text(result.checkpoint, "import ", 10, temperature=0, device="cpu") for _ in range(2)]
    assert greedy[0] == greedy[1]


def test_rope_scaling_checkpoint_round_trip_and_unsavable_options_refused(tmp_path):
    """A RopeScaling in mixer_options is stored as the dict of its fields (a weights-only load refuses the class)
    and the rebuilt layer has it back; a mask pattern, which no checkpoint can hold, is refused when saving."""
    from subquad import masks
    from subquad.models import HybridLM
    from subquad.nn import RopeScaling

    scaling = RopeScaling("yarn", 2.0, original_max_position=64)
    torch.manual_seed(0)
    model = HybridLM(256, 32, "A", heads=2, mixer_options={"A": {"rope_scaling": scaling}}).eval()
    save_checkpoint(tmp_path / "ck.pt", model, TrainConfig(mixer_options=model.config["mixer_options"]), {})
    loaded, ckpt = load_checkpoint(tmp_path / "ck.pt")
    assert loaded.blocks[0].mixer.rope.scaling == scaling
    assert ckpt["train_config"]["mixer_options"]["A"]["rope_scaling"]["factor"] == 2.0
    ids = torch.randint(0, 256, (1, 12))
    torch.testing.assert_close(loaded(ids), model(ids))
    masked = HybridLM(256, 32, "A", heads=2, mixer_options={"A": {"mask": masks.strided(3)}})
    with pytest.raises(ValueError, match=r"\['A'\]\['mask'\]"):
        save_checkpoint(tmp_path / "masked.pt", masked, TrainConfig(), {})


def test_cli_train_and_generate(tmp_path):
    from typer.testing import CliRunner

    from subquad.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["train", "--layers", "LE", "--d-model", "32", "--steps", "4", "--seq-len", "32",
                              "--batch-size", "4", "--eval-every", "2", "--max-bytes", "300000",
                              "-O", "L.window=8", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert "bits/byte" in res.output and (tmp_path / "loss.png").exists()
    model, _ = load_checkpoint(tmp_path / "checkpoint.pt")
    assert model.blocks[0].mixer.window == 8
    res = runner.invoke(app, ["generate", str(tmp_path / "checkpoint.pt"), "-p", "class ", "-n", "8", "--device",
                              "cpu"])
    assert res.exit_code == 0 and res.output.startswith("class ")
    res = runner.invoke(app, ["generate", str(tmp_path / "checkpoint.pt"), "-n", "4", "--top-p", "0.9", "--device",
                              "cpu"])
    assert res.exit_code == 0 and res.output.startswith("def "), res.output
    for bad in ("2", "0"):
        res = runner.invoke(app, ["generate", str(tmp_path / "checkpoint.pt"), "--top-p", bad, "--device", "cpu"])
        assert res.exit_code != 0 and "--top-p" in res.output
    res = runner.invoke(app, ["train", "-O", "window=8"])
    assert res.exit_code != 0 and "MIXER.NAME=VALUE" in res.output


def test_learning_rate_schedule():
    cfg = TrainConfig(steps=100, warmup=10, lr=1.0, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(99, cfg) == pytest.approx(0.1, abs=1e-3)
    with pytest.raises(ValueError, match="steps"):
        TrainConfig(steps=0)


def test_corpus_is_the_stdlib_split_by_file(corpus):
    files = stdlib_files()
    assert len(files) > 500 and all(f.suffix == ".py" for f in files)
    assert all("site-packages" not in f.relative_to(stdlib_root()).parts for f in files)
    assert corpus.train.dtype == torch.uint8 and corpus.val.numel() > 0
    assert 0.01 < corpus.val.numel() / corpus.nbytes < 0.2
    assert b"def " in bytes(corpus.train[:200_000].tolist())
    # no file in both splits: the validation text is not a substring of the training text
    probe = bytes(corpus.val[:64].tolist())
    assert probe not in bytes(corpus.train.tolist())
    batch = random_windows(corpus.train, 3, 17, torch.Generator().manual_seed(0))
    assert batch.shape == (3, 17) and batch.dtype == torch.long and int(batch.max()) < 256


def test_synthetic_recall_tasks():
    ids, targets = mqar(4, 3, 20, 32, torch.Generator().manual_seed(0))
    assert ids.shape == targets.shape == (4, 20)
    for b in range(4):
        pairs = {int(ids[b, 2 * i]): int(ids[b, 2 * i + 1]) for i in range(3)}
        asked = (targets[b] != IGNORE).nonzero().flatten()
        assert len(asked) == 3
        assert all(pairs[int(ids[b, t])] == int(targets[b, t]) for t in asked)
    ids, targets = needle(2, 12, 16, depth=0.5)
    pos = int(0.5 * 8)
    assert (ids[:, pos] == 1).all() and torch.equal(ids[:, pos + 1], targets[:, -1]) and (ids[:, -1] == 1).all()
    with pytest.raises(ValueError, match="num_pairs"):
        mqar(1, 10, 20, 32)


def test_mqar_fills_every_query_slot_when_there_are_just_enough():
    """seq_len 12, 4 pairs: the check admits 4 query slots for 4 keys, so each slot, the last included, must
    hold a key (the draw used to leave the last one out and fail)."""
    ids, targets = mqar(2, 4, 12, 16, torch.Generator().manual_seed(0))
    assert (targets[:, 8:] != IGNORE).all() and (targets[:, :8] == IGNORE).all()
    for b in range(2):
        pairs = dict(zip(ids[b, 0:8:2].tolist(), ids[b, 1:8:2].tolist()))
        assert sorted(ids[b, 8:].tolist()) == sorted(pairs)
        assert [pairs[k] for k in ids[b, 8:].tolist()] == targets[b, 8:].tolist()


@pytest.mark.parametrize("depth", [-0.5, 1.5])
def test_needle_depth_is_a_fraction(depth):
    """Outside [0, 1] the needle lands at a negative index (counted from the end) or past the end."""
    with pytest.raises(ValueError, match="depth"):
        needle(1, 16, 10, depth=depth)


def test_cli_bad_values_are_usage_errors(tmp_path):
    """Bad values reach the config or the model as ValueErrors naming their field: the command line shows them
    as usage errors (exit 2) before any work, not as tracebacks (a file as --out failed after training)."""
    from typer.testing import CliRunner

    from subquad.cli import app

    runner = CliRunner()
    afile = tmp_path / "afile"
    afile.write_text("x")
    for args, words in ((["train", "--steps", "0"], "steps"), (["train", "--heads", "3"], "heads"),
                        (["train", "--max-bytes", "-5"], "--max-bytes"), (["train", "-o", str(afile)], "--out"),
                        (["train", "--device", "gpu"], "device"), (["generate", str(afile)], "checkpoint"),
                        (["generate", str(afile), "--top-k", "-1"], "--top-k")):
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and words in result.output, (args, result.output)


def test_a_small_corpus_still_has_train_and_validation_bytes():
    """--max-bytes small enough to read one file put that file in validation and back in train, leaving
    validation empty (a crash when evaluating)."""
    from subquad.data.corpus import load_corpus

    corpus = load_corpus(max_bytes=500)
    assert corpus.train.numel() > 0 and corpus.val.numel() > 0


def test_bad_threads_and_too_long_windows_are_refused_before_training(tmp_path, corpus):
    """``--threads -1`` failed in torch.set_num_threads with a traceback (0 was ignored); a ``seq_len`` longer than
    the validation split trained ``eval_every`` steps, then failed at the first evaluation, losing the run."""
    from typer.testing import CliRunner

    from subquad.cli import app

    for threads in (0, -1):
        with pytest.raises(ValueError, match="threads"):
            TrainConfig(threads=threads)
    result = CliRunner().invoke(app, ["train", "--threads", "-1", "-o", str(tmp_path / "t")])
    assert result.exit_code == 2 and "threads" in result.output, result.output
    small = load_corpus(max_bytes=1000)
    cfg = TrainConfig(layers="M", d_model=32, seq_len=small.val.numel(), batch_size=1, steps=3, eval_every=2,
                      out=str(tmp_path / "run"))
    with pytest.raises(ValueError, match=r"seq_len: .*val split"):
        train(cfg, progress=False, corpus=small)
    assert not (tmp_path / "run").exists()  # refused before the first step, not after


def test_generate_refuses_a_nan_temperature():
    from subquad.models import HybridLM

    model = HybridLM(256, 32, "M", heads=1).eval()
    with pytest.raises(ValueError, match="temperature"):
        model.generate(torch.zeros(1, 3, dtype=torch.long), 2, temperature=float("nan"))


def test_train_help_lists_every_mixer_letter():
    """``--layers``'s help names each letter the model builds (NSA's S and LSH's H were missing)."""
    from typer.testing import CliRunner

    from subquad.cli import app
    from subquad.nn.registry import REGISTRY

    result = CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "200"})
    listed = re.search(r"One mixer letter per layer \(([A-Z, ]+)\)", result.output)
    assert listed and set(listed.group(1).split(", ")) == set(REGISTRY), result.output
