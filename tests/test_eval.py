"""Evaluations: MQAR recall, the needle grid, the fidelity of a swapped attention, `subquad eval`."""

import pytest
import torch
from typer.testing import CliRunner

import subquad.eval
from subquad.cli import app
from subquad.data import IGNORE, needle
from subquad.eval import (answer_hits, fidelity, needle_grid, recall_accuracy, replace_attention,
                          train_and_eval_mqar)
from subquad.models import HybridLM
from subquad.train import TrainConfig, save_checkpoint

torch.set_num_threads(1)  # (several threads on the 2-core CI, shared with other jobs, are several times slower)


def test_answer_hits_count_answer_positions_only():
    targets = torch.full((2, 4), IGNORE)
    targets[0, 1], targets[0, 3], targets[1, 2] = 5, 6, 7
    logits = torch.zeros(2, 4, 8)
    logits[0, 1, 5] = logits[0, 3, 2] = logits[1, 2, 7] = 1.0  # right, wrong, right
    logits[0, 0, 3] = logits[1, 0, 3] = 1.0  # ignored positions: whatever they predict counts for nothing
    assert answer_hits(logits, targets) == (2, 3)
    assert recall_accuracy(lambda ids: logits, [(torch.zeros(2, 4, dtype=torch.long), targets)]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="batches"):
        recall_accuracy(lambda ids: logits, [(torch.zeros(2, 4, dtype=torch.long), torch.full((2, 4), IGNORE))])


def test_softmax_attention_learns_mqar_and_the_run_is_deterministic():
    """Two softmax layers learn the induction lookup in 200 steps at this size (seeds 0-3 all reach >= 0.9);
    chance for a model copying a random listed value is 1 / num_pairs = 0.25."""
    run = dict(seq_len=16, num_pairs=4, vocab_size=16, d_model=64, steps=200, batch_size=64, seed=1)
    result = train_and_eval_mqar("AA", **run)
    assert result.chance == 0.25 and result.accuracy > 0.75
    assert sum(result.losses[-10:]) / 10 < result.losses[0] / 4
    short = dict(run, steps=5)
    a, b = train_and_eval_mqar("AA", **short), train_and_eval_mqar("AA", **short)
    assert a.losses == b.losses and a.accuracy == b.accuracy
    assert train_and_eval_mqar("AA", **dict(short, seed=2)).losses != a.losses


class WindowOracle(torch.nn.Module):
    """Answers a needle exactly when the marker (token 1) lies within its last ``window`` tokens: the value after
    the latest earlier marker it can see, else token 0."""

    def __init__(self, window: int, vocab_size: int):
        super().__init__()
        self.window, self.vocab_size = window, vocab_size

    def forward(self, ids):
        logits = torch.zeros(*ids.shape, self.vocab_size)
        n = ids.shape[1]
        for b in range(ids.shape[0]):
            seen = [p for p in range(max(0, n - self.window), n - 2) if ids[b, p] == 1]
            logits[b, -1, ids[b, seen[-1] + 1] if seen else 0] = 1.0
        return logits


def test_needle_grid_shape_and_depth_placement():
    depths, lengths = [0.0, 0.5, 1.0], [8, 20, 40]
    ids, _ = needle(3, 40, 16, depth=0.5)
    assert (ids[:, 18] == 1).all()  # int(0.5 * (40 - 4))
    grid = needle_grid(WindowOracle(12, 16), lengths, depths, vocab_size=16, trials=8)
    assert len(grid.accuracy) == len(depths) and all(len(row) == len(lengths) for row in grid.accuracy)
    # the needle sits at int(depth * (n - 4)); the oracle sees it when that is >= n - 12
    expected = [[1.0 if int(d * (n - 4)) >= n - 12 else 0.0 for n in lengths] for d in depths]
    assert grid.accuracy == expected
    assert expected[2] == [1.0, 1.0, 1.0] and expected[0] == [1.0, 0.0, 0.0]


def test_a_needle_grid_cell_keeps_its_needles_when_the_grid_around_it_changes():
    """A cell's haystacks come from its own length and depth, not its place in the grid."""
    seen = []

    def record(ids):
        seen.append(ids.clone())
        return torch.zeros(*ids.shape, 16)

    needle_grid(record, [16, 32], [0.0, 0.5], vocab_size=16, trials=4)
    cell = seen[-1]  # depth 0.5, 32 tokens
    seen.clear()
    needle_grid(record, [32], [0.5], vocab_size=16, trials=4)
    assert torch.equal(seen[0], cell)


def test_needle_grid_plot(tmp_path):
    grid = needle_grid(WindowOracle(12, 16), [8, 16], [0.0, 1.0], vocab_size=16, trials=2)
    path = grid.plot(tmp_path / "needle.png")
    assert path.read_bytes()[:4] == b"\x89PNG"


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return HybridLM(64, 32, "AMA", heads=2, kv_heads=1).eval()


def test_fidelity_of_a_model_against_itself_is_exact(model):
    ids = torch.randint(0, 64, (2, 33))
    same = fidelity(model, model, [ids])
    assert same.logits_rel_l2 == 0.0 and same.kl == 0.0 and same.exact_bits == same.swapped_bits
    assert same.tokens == 64 and same.exact_perplexity == pytest.approx(2 ** same.exact_bits)
    # a window longer than the sequence changes nothing
    assert fidelity(model, replace_attention(model, "window", window=64), [ids]).logits_rel_l2 == 0.0


@pytest.mark.parametrize("mechanism, options", [("window", {"window": 4}), ("linear", {}),
                                                ("linear", {"feature_map": "hedgehog"})])
def test_a_swapped_model_moves_its_predictions(model, mechanism, options):
    ids = torch.randint(0, 64, (2, 33))
    swapped = replace_attention(model, mechanism, **options)
    assert swapped.layer_letters == ("LML" if mechanism == "window" else "FMF")
    assert model.layer_letters == "AMA"  # the original is untouched
    result = fidelity(model, swapped, [ids])
    assert result.logits_rel_l2 > 1e-4 and result.kl > 0
    assert result.swapped_bits != result.exact_bits
    # every weight but the converted projections is the original's
    original = model.state_dict()
    shared = [key for key in swapped.state_dict() if key in original]
    assert {"embed.weight", "blocks.1.mixer.in_proj.weight", "blocks.0.mixer.o_proj.weight"} <= set(shared)
    for key in shared:
        torch.testing.assert_close(swapped.state_dict()[key], original[key])


def test_linear_swap_fuses_the_attention_projections_with_kv_heads_repeated(model):
    swapped = replace_attention(model, "linear")
    exact, linear = model.blocks[0].mixer, swapped.blocks[0].mixer
    x = torch.randn(1, 5, 32)
    q, k, v = linear.qkv_proj(x).view(1, 5, 3, 2, 16).unbind(2)
    k_exact, v_exact = exact.kv_proj(x).view(1, 5, 2, 1, 16).unbind(2)  # one key/value head (MQA)
    torch.testing.assert_close(q, exact.q_proj(x).view(1, 5, 2, 16))
    torch.testing.assert_close(k, k_exact.expand(1, 5, 2, 16))
    torch.testing.assert_close(v, v_exact.expand(1, 5, 2, 16))
    torch.testing.assert_close(linear.o_proj.weight, exact.o_proj.weight)


def test_gqa_swap_pools_the_exact_layers_only_and_its_config_rebuilds_it():
    """The sliding-window layers are not what is swapped: their key/value heads stay as trained."""
    torch.manual_seed(0)
    lm = HybridLM(64, 32, "LA", heads=2, mixer_options={"L": {"window": 4}})
    swapped = replace_attention(lm, "gqa", kv_heads=1)
    assert swapped.blocks[1].mixer.kv_heads == 1
    assert swapped.blocks[0].mixer.kv_heads == 2
    torch.testing.assert_close(swapped.blocks[0].mixer.kv_proj.weight, lm.blocks[0].mixer.kv_proj.weight)
    config = dict(swapped.config)
    rebuilt = HybridLM(config.pop("vocab_size"), config.pop("d_model"), config.pop("layers"), **config)
    rebuilt.load_state_dict(swapped.state_dict())
    ids = torch.randint(0, 64, (1, 9))
    torch.testing.assert_close(rebuilt.eval()(ids), swapped(ids))


def test_replace_attention_refuses_what_it_cannot_convert(model):
    with pytest.raises(ValueError, match="mechanism"):
        replace_attention(model, "lsh")
    with pytest.raises(ValueError, match="model"):
        replace_attention(HybridLM(64, 32, "MF"), "window")
    with pytest.raises(ValueError, match="mechanism"):  # its own L layers have another window
        replace_attention(HybridLM(64, 32, "AL", mixer_options={"L": {"window": 8}}), "window", window=4)
    # the swapped layers are all L, one set of options: A and G layers with different key/value heads cannot
    # both become them (their weights failed to load, a RuntimeError)
    with pytest.raises(ValueError, match="model: expected its exact attention layers to share their options"):
        replace_attention(HybridLM(64, 32, "AG", heads=2, mixer_options={"G": {"kv_heads": 1}}), "window")


def test_cli_eval_recall_prints_a_table():
    result = CliRunner().invoke(app, ["eval", "recall", "--patterns", "AA,FF", "--steps", "3", "--batch-size", "8"])
    assert result.exit_code == 0, result.output
    assert "MQAR recall" in result.output and "AA" in result.output and "FF" in result.output
    assert "recall" in result.output and "┃" in result.output


def test_cli_eval_needle_and_fidelity(tmp_path):
    result = CliRunner().invoke(app, ["eval", "needle", "--steps", "2", "--lengths", "8,16", "--depths", "0,1",
                                      "--trials", "4", "-o", str(tmp_path / "n.png")])
    assert result.exit_code == 0, result.output
    assert "depth / length" in result.output and (tmp_path / "n.png").exists()
    torch.manual_seed(0)
    lm = HybridLM(256, 32, "AA", heads=2)
    save_checkpoint(tmp_path / "checkpoint.pt", lm, TrainConfig(layers="AA", d_model=32), {})
    result = CliRunner().invoke(app, ["eval", "fidelity", str(tmp_path / "checkpoint.pt"), "--to", "window",
                                      "--window", "8", "--batches", "1", "--batch-size", "2", "--seq-len", "32",
                                      "--max-bytes", "200000"])
    assert result.exit_code == 0, result.output
    assert "AA -> LL" in result.output and "bits per byte" in result.output and "KL" in result.output


def test_cli_eval_needle_checks_the_grid_before_it_trains(monkeypatch):
    """A bad --depths or --lengths is refused at once, not after the model's training."""
    def train(*args, **kwargs):
        raise AssertionError("the model was trained before the grid was checked")

    monkeypatch.setattr(subquad.eval, "train_needle_model", train)
    monkeypatch.setattr(subquad.eval.needle, "train_needle_model", train)
    result = CliRunner().invoke(app, ["eval", "needle", "--depths", "0,50"])
    assert result.exit_code == 2 and "depths: expected fractions in [0, 1]" in result.output, result.output
    result = CliRunner().invoke(app, ["eval", "needle", "--lengths", "4,16"])
    assert result.exit_code == 2 and "lengths: expected context lengths" in result.output, result.output
