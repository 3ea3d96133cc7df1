"""Shared fixtures: a word-level tokenizer, tiny random models of several families, a tiny task."""

from __future__ import annotations

# Every jaxtyping annotation in parts is checked at run time (beartype), so a wrong shape or dtype fails a
# test. The hook must be installed before the first `import parts`.
from jaxtyping import install_import_hook

# The PEP 484 numeric tower (an int where a float is annotated) is accepted, as mypy accepts it.
install_import_hook("parts", "beartype.beartype(conf=beartype.BeartypeConf(is_pep484_tower=True))")

import json  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

WORDS = (
    "[PAD] [UNK] [BOS] review sentiment : positive negative great awful good bad film movie plot "
    "acting the a was is and but not very dull fun boring loved hated ? yes no"
).split()
POSITIVE = ["great", "good", "fun", "loved"]
NEGATIVE = ["awful", "bad", "dull", "boring", "hated"]


@pytest.fixture
def unchecked_shapes():
    """Run without the test-time shape checker, as parts runs for a user: for tests of the PartsError a
    function raises itself on malformed input (the checker would stop the call before the function's check)."""
    import jaxtyping

    jaxtyping.config.update("jaxtyping_disable", True)
    yield
    jaxtyping.config.update("jaxtyping_disable", False)


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    """A word-level tokenizer saved to disk (the bridge re-reads it by `name_or_path`)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]", eos_token="[BOS]"
    )
    folder = tmp_path_factory.mktemp("tokenizer")
    fast.save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


def make_hf_model(family: str, seed: int = 0, **overrides):
    """A tiny randomly initialised Hugging Face causal LM of one family."""
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        GPTNeoXConfig,
        GPTNeoXForCausalLM,
        LlamaConfig,
        LlamaForCausalLM,
    )

    torch.manual_seed(seed)
    vocab = len(WORDS)
    if family == "llama":  # RMSNorm, rotary, grouped-query attention, tied unembedding
        config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                             pad_token_id=0, tie_word_embeddings=True, **overrides)
        return LlamaForCausalLM(config).eval()
    if family == "neox":  # LayerNorm, parallel residual, biases, untied unembedding (Pythia)
        config = GPTNeoXConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                               num_attention_heads=4, max_position_embeddings=256, pad_token_id=0,
                               tie_word_embeddings=False, **overrides)
        return GPTNeoXForCausalLM(config).eval()
    if family == "gpt2":  # LayerNorm, learned absolute positions, biases, tied unembedding
        config = GPT2Config(vocab_size=vocab, n_embd=32, n_layer=3, n_head=4, n_positions=256, pad_token_id=0, **overrides)
        return GPT2LMHeadModel(config).eval()
    raise ValueError(family)


FAMILIES = ("llama", "neox", "gpt2")


@pytest.fixture(scope="session", params=FAMILIES)
def tiny_model(request, tokenizer):
    from parts.model.loading import from_hf

    model = from_hf(make_hf_model(request.param), tokenizer, f"tiny-{request.param}")
    return model


@pytest.fixture
def one_thread():
    """One torch thread, so the process's CPU time is the work's (the shared test machine's other load aside)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def cpu_rate(one_thread):
    """`probe_rate(shape)` in CPU time rather than wall-clock time, at one torch thread: what one thread does when it
    runs, whatever else the machine runs meanwhile (a wall-clock probe and a wall-clock run a minute apart see
    different loads). A plan at this rate is compared with the run's `time.process_time()`."""
    from parts.experiments import plan as plan_module

    def rate(shape) -> float:
        wall, cpu = time.perf_counter(), time.process_time()
        probed = plan_module.probe_rate(shape, "float32", "cpu", seconds=2.0)
        return probed * (time.perf_counter() - wall) / (time.process_time() - cpu)
    return rate


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer):
    """A tiny Llama saved like a user's own model folder (n_ctx 256), for `--model FOLDER`."""
    folder = tmp_path_factory.mktemp("tiny-llama-model")
    make_hf_model("llama").save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama(tokenizer):
    from parts.model.loading import from_hf

    return from_hf(make_hf_model("llama"), tokenizer, "tiny-llama")


def _review(rng, label: int) -> str:
    words = POSITIVE if label == 1 else NEGATIVE
    n = int(rng.integers(2, 7))
    filler = ["the", "film", "was", "very", "and", "plot", "acting", "movie", "is", "a"]
    return " ".join(str(rng.choice(words if i % 2 else filler)) for i in range(n))


@pytest.fixture(scope="session")
def tiny_task_file(tmp_path_factory) -> Path:
    """A user task (JSON + data folder) over the tokenizer's words: 40 train, 30 test rows."""
    import numpy as np

    folder = tmp_path_factory.mktemp("tinytask")
    rng = np.random.default_rng(0)
    for split, n in (("train", 40), ("test", 30)):
        rows = [{"text": _review(rng, i % 2), "label": i % 2} for i in range(n)]
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = {"name": "tiny", "data_dir": ".", "template": "review : {text} sentiment :",
            "label_words": [" negative", " positive"], "label_names": ["negative", "positive"],
            "templates": {"2": "review {text} ?"}}
    path = folder / "tiny.json"
    path.write_text(json.dumps(spec))
    return path


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The shared data directory (PARTS_DATA_DIR); integration tests need it."""
    value = os.environ.get("PARTS_DATA_DIR")
    if not value:
        here = Path(__file__).resolve().parents[1].parent / "shared" / "data"
        if here.is_dir():
            return here
        message = "PARTS_DATA_DIR is not set (scripts/test.sh sets it to ../shared/data)"
        if os.environ.get("CI"):
            pytest.fail(message)  # CI always has the data: a skip there would hide the integration tests
        pytest.skip(message)
    return Path(value)


@pytest.fixture(scope="session")
def embedded_model():
    from parts.model.loading import load_model

    return load_model(device="cpu")


@pytest.fixture(scope="module")
def shifted_task_file(tmp_path_factory) -> Path:
    """A transfer target (task JSON beside its data) with the tiny task's labels and a `text` field."""
    folder = tmp_path_factory.mktemp("shifted")
    rows = [{"text": f"the movie was very {word}", "label": label} for label, word in [(1, "great"), (0, "awful")] * 3]
    (folder / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "train.jsonl").write_text("")
    path = folder / "shifted.json"
    path.write_text(json.dumps({"name": "shifted", "data_dir": ".", "template": "{text} ?",
                                "label_words": [" no", " yes"]}))
    return path
