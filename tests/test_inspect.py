"""`parts inspect` and `parts.inspect_head`: where one head's vote comes from, on a tiny model's run.

The card's numbers are the DataFrames' numbers; the aggregations are recomputed here from the source table;
bad input gets one-line errors.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from parts.analysis.inspect_head import format_card, inspect_head, run_sources, source_table, token_segments
from parts.cli import main
from parts.errors import PartsError
from tests.conftest import make_hf_model


@pytest.fixture(scope="module")
def tiny_run(tiny_llama, tiny_task_file, tmp_path_factory):
    from parts.experiments.runner import decompose_task

    run = decompose_task(tiny_llama, str(tiny_task_file), template=1, seed=0, limit=8, progress=False)
    folder = run.save(tmp_path_factory.mktemp("inspect") / "run")
    return run, folder


def test_segments_follow_the_demonstrations_label_words():
    prompt = "Review: good\nSentiment: positive\nReview: bad\nSentiment: negative\nReview: ok\nSentiment:"
    words = (" negative", " positive")
    # Character offsets of a tokenisation: BOS (no characters), then words with their leading spaces.
    cuts = [0, 7, 12, 13, 23, 32, 33, 40, 44, 45, 55, 64, 65, 72, 75, 76, 86]
    offsets = [(0, 0)] + list(zip(cuts[:-1], cuts[1:], strict=True))
    segments, demos, labels = token_segments(prompt, offsets, words, "\n", "\nSentiment:")
    assert segments[0] == "BOS"
    assert [prompt[a:b] for (a, b), s in zip(offsets, segments, strict=True) if s == "demonstration label word"] == [
        " positive", " negative"]
    assert [prompt[a:b] for (a, b), s in zip(offsets, segments, strict=True) if s == "separator"] == ["\n", "\n"]
    assert segments[-4:] == ["query"] * 4 and demos[-1] == -1
    assert labels[5] == 1 and labels[11] == 0 and demos[5] == 0 and demos[11] == 1


def test_card_numbers_are_the_dataframes(tiny_llama, tiny_run):
    run, _ = tiny_run
    card = inspect_head(tiny_llama, run, "L2H3", examples=2, top=3)
    sources = card.sources
    # Every example's sources sum to the head's own vote, which is its run's component logits centred.
    logits = run.component_logits[:, run.component_index("L2H3")]
    centred = logits - logits.mean(-1, keepdim=True)
    for example, frame in sources.groupby("example"):
        gold, predicted = int(frame["gold"].iloc[0]), int(frame["predicted"].iloc[0])
        assert predicted == int(logits[example].argmax())
        assert frame["vote_gold"].sum() == pytest.approx(float(centred[example, gold]), abs=1e-5)
        assert frame["vote_predicted"].sum() == pytest.approx(float(centred[example, predicted]), abs=1e-5)
    shares = card.shares.groupby(["example", "head"])["share_predicted"].sum()
    assert shares.to_numpy() == pytest.approx(1.0, abs=1e-3)
    # The copy score, by hand: votes of label words toward their own label over the attention they get.
    words = sources[sources["segment"] == "demonstration label word"]
    assert len(words) == 8 * run.prompts.shots
    copy = words["vote_own_label"].sum() / words["attention"].sum()
    assert card.scores["copy_score"].iloc[0] == pytest.approx(copy)
    summary = card.summary.iloc[0]
    assert summary["accuracy"] == pytest.approx(float(run.component_accuracy[run.component_index("L2H3")]))
    assert summary["direct_vote_gold"] == pytest.approx(float(centred[torch.arange(8), run.labels].mean()), abs=1e-6)
    text = format_card(card, run.prompts.label_names)
    for shown in (f"{summary['accuracy']:.1%}", f"{summary['direct_vote_gold']:+.3f}",
                  f"copy score {card.scores['copy_score'].iloc[0]:+.3f}",
                  f"{card.profile['attention'].iloc[0]:.3f}", f"{card.top_sources['share_predicted'].iloc[0]:.1%}"):
        assert shown in text
    assert len(card.top_sources) == 2 * 3


def test_parts_inspect_prints_the_card(tiny_run, tiny_model_dir, capsys):
    _, folder = tiny_run
    assert main(["inspect", str(folder), "L1H0", "--model", str(tiny_model_dir), "--device", "cpu",
                 "--examples", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("L1H0 | ") and "copy score" in out and "class matching" in out
    assert "example 0 (gold" in out and "example 1 (gold" not in out


@pytest.mark.parametrize(("head", "message"), [("MLP1", "is an MLP"), ("L3H0", "L0H0-L2H3"), ("L0H7", "L0H0-L2H3")])
def test_bad_heads_are_one_line_errors(tiny_run, tiny_model_dir, capsys, head, message):
    _, folder = tiny_run
    assert main(["inspect", str(folder), head, "--model", str(tiny_model_dir), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_a_run_without_token_ids_is_refused(tiny_llama, tiny_run):
    run, _ = tiny_run
    with pytest.raises(PartsError, match="records no prompts' token ids"):
        run_sources(tiny_llama, dataclasses.replace(run, token_ids=None), ["L0H0"])


def test_a_model_that_is_not_the_runs_is_refused(tiny_run, tokenizer):
    from parts.model.loading import from_hf

    run, _ = tiny_run
    other = from_hf(make_hf_model("llama", seed=1), tokenizer, "tiny-llama")  # same shape and tokenizer, other weights
    with pytest.raises(PartsError, match="does not match the run") as caught:
        run_sources(other, run, ["L2H3"])
    assert "\n" not in str(caught.value)
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256, pad_token_id=0)
    wider = from_hf(LlamaForCausalLM(config).eval(), tokenizer, "tiny-llama")
    with pytest.raises(PartsError, match=r"model \(3 layers x 8 heads\) does not match"):
        run_sources(wider, run, ["L2H3"])


def test_the_source_table_matches_the_attribution(tiny_llama, tiny_run):
    run, _ = tiny_run
    attribution = run_sources(tiny_llama, run, ["L0H1", "L2H3"], examples=[3, 5])
    table = source_table(run, attribution, tiny_llama.tokenizer, [3, 5])
    assert set(table["example"]) == {3, 5}
    frame = table[(table["example"] == 5) & (table["head"] == "L0H1")]
    assert frame["attention"].to_numpy() == pytest.approx(attribution.attention[1, 0, : len(frame)].numpy())
    assert frame["token"].tolist() == [tiny_llama.tokenizer.decode([t]) for t in run.token_ids[5]]


def test_the_card_shows_the_total_effect_where_parts_effects_ran(tiny_run, tiny_model_dir, tmp_path, capsys):
    import shutil

    from parts.decomposition.effect_data import TotalEffects

    run, folder = tiny_run
    copy = tmp_path / "run"
    shutil.copytree(folder, copy)
    generator = torch.Generator().manual_seed(0)
    total = torch.randn(8, len(run.component_names), 2, generator=generator)
    TotalEffects(total, run.model_logits, list(run.component_names), {"ablation": "mean"}).save(copy)
    assert main(["inspect", str(copy), "L1H0", "--model", str(tiny_model_dir), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    head = total[:, run.component_index("L1H0")]
    votes = (head - head.mean(-1, keepdim=True))[torch.arange(8), run.labels]
    accuracy = float((head.argmax(-1) == run.labels).float().mean())
    assert (f"total effect (mean ablation, all 8 examples): vote for the gold label {float(votes.mean()):+.3f} "
            f"(sd {float(votes.std()):.3f}); accuracy {accuracy:.1%}") in out


def test_one_forward_gives_every_heads_attention_as_its_own_forward(tiny_llama, tiny_run):
    """The report's views share one forward per example: each head's row must be what a forward for that head
    alone gives (bit for bit), in the order asked, a distribution over the prompt's positions."""
    from parts.analysis.inspect_head import attention_from_last_token, heads_attention_from_last_token

    run, _ = tiny_run
    token_ids = list(run.token_ids[0])
    heads = [(1, 2), (0, 0), (1, 0)]  # two layers, out of order
    rows = heads_attention_from_last_token(tiny_llama, token_ids, heads)
    assert rows.shape == (3, len(token_ids))
    for row, (layer, head) in zip(rows, heads, strict=True):
        assert torch.equal(row, attention_from_last_token(tiny_llama, token_ids, layer, head))
    torch.testing.assert_close(rows.sum(-1), torch.ones(3))
    assert not torch.equal(rows[0], rows[1])
    with pytest.raises(PartsError, match="L9H0 is not in this model"):
        heads_attention_from_last_token(tiny_llama, token_ids, [(0, 0), (9, 0)])
