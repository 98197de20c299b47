"""What a trained model folder says about itself, and where it goes.

`model_card` writes the README.md of the saved model folder: a Hugging Face model card (YAML
metadata, then what a reader needs to reuse the model: base model, data and pair counts, loss,
aggregation, beta and its summed-scale equivalent, steps, final metrics, the config, the library
version). `push_folder` uploads the folder to the Hub (`train.push_to_hub`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from . import __version__
from .config import Config, check_repo_id  # noqa: F401 (check_repo_id: re-exported)
from .versions import installed_versions

if TYPE_CHECKING:
    from .data import TokenizedPair

# model.name "smollm2-135m" (models.SMOLLM2_NAME): the Hub model its GGUF file was made from
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def hub_id(name: str) -> str | None:
    """`name` if it reads as a Hub id ("owner/name", not a local path), else None. A data source
    "owner/name:subset" gives its dataset id."""
    name = name.split(":")[0]
    return None if Path(name).exists() or name.count("/") != 1 else name


def base_model_id(name: str) -> str | None:
    """The Hub id of model.name, for the card's metadata; None for a local folder."""
    from .models import SMOLLM2_NAME

    return SMOLLM2_HUB_ID if name == SMOLLM2_NAME else hub_id(name)


def _number(x: float) -> str:
    return f"{x:.4g}"


def model_card(
    cfg: Config,
    *,
    sources: Sequence[str],
    train_pairs: Sequence[TokenizedPair],
    eval_pairs: int,
    steps: int,
    last_train: dict[str, float],
    eval_metrics: dict[str, float],
) -> str:
    """The model card of a run trained with `cfg` for `steps` steps on `train_pairs` (read from
    `sources`; empty when the pairs were given in code), with `eval_pairs` held out.

    beta on the summed scale: averaging divides a log-ratio by |y|^e (e = 0 for sum, 1 for mean,
    alpha for power), so beta with aggregation e acts like beta_sum = beta / L^e on summed
    log-ratios, L the mean completion length of the training pairs (avgalign.study's
    calibration, inverted)."""
    from huggingface_hub import ModelCardData

    from .data import mean_completion_length
    from .losses import aggregation_exponent

    lc, tc = cfg.loss, cfg.train
    exponent = aggregation_exponent(lc.aggregation, lc.alpha)
    length = mean_completion_length(train_pairs)
    beta_sum = lc.beta / length**exponent
    base = base_model_id(cfg.model.name)
    datasets = [d for d in map(hub_id, sources) if d]
    metadata = ModelCardData(
        library_name="transformers",
        base_model=base,
        datasets=datasets or None,
        pipeline_tag="text-generation",
        tags=["avgalign", lc.name, f"aggregation-{lc.aggregation}", "alignment"],
    )
    aggregation = {
        "sum": "sum (summed log-likelihoods)",
        "mean": "mean (log-likelihoods divided by the completion length)",
        "power": f"power (log-likelihoods divided by the completion length^{_number(lc.alpha)})",
    }[lc.aggregation]
    data = ", ".join(f"`{s}`" for s in sources) or "pairs given in code"
    lora = f"LoRA r={cfg.model.lora.r}, merged into the weights" if cfg.model.lora.r else "full"
    also = f" ({base})" if base and base != cfg.model.name else ""
    held_out = ""
    if sources and eval_pairs:
        held_out = (
            f" (from `{cfg.data.eval}`)" if cfg.data.eval
            else f" (data.eval_fraction={cfg.data.eval_fraction:g} of the data, drawn by seed)"
        )
    rows = [
        ("base model", f"`{cfg.model.name}`{also}"),
        ("data", data),
        ("training pairs", str(len(train_pairs))),
        ("held-out pairs", f"{eval_pairs}{held_out}"),
        ("loss", f"`{lc.name}`"),
        ("aggregation", aggregation),
        ("beta", _number(lc.beta)),
        (
            "beta on the summed scale",
            f"{_number(beta_sum)} = beta / L^{_number(exponent)}, L = {length:.1f} tokens "
            "(mean completion length of the training pairs)",
        ),
        ("steps", f"{steps} of {tc.batch_size} pairs"),
        ("fine-tuning", lora),
        ("library", f"avgalign {__version__}"),
        ("versions", ", ".join(f"{k} {v}" for k, v in installed_versions().items())),
    ]
    metrics = sorted(set(last_train) | set(eval_metrics))
    lines = [
        f"# {Path(tc.output_dir).name}",
        "",
        f"`{cfg.model.name}` aligned on preference pairs with the `{lc.name}` loss "
        f"({lc.aggregation} aggregation) by avgalign {__version__}.",
        "",
        "## Training",
        "",
        "| | |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in rows),
        "",
        "## Final metrics",
        "",
        "| metric | last training step | held-out pairs |",
        "|---|---|---|",
        *(
            f"| {m} | {_value(last_train, m)} | {_value(eval_metrics, m)} |"
            for m in metrics
        ),
        "",
        "## Reproduce",
        "",
        "Save the config below as `config.yaml` and run `avgalign train config.yaml`.",
        "",
        "```yaml",
        yaml.safe_dump(cfg.to_dict(), sort_keys=False).rstrip(),
        "```",
        "",
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'name = "{tc.push_to_hub or "path/to/this/folder"}"',
        "model = AutoModelForCausalLM.from_pretrained(name)",
        "tokenizer = AutoTokenizer.from_pretrained(name)",
        "```",
        "",
    ]
    return f"---\n{metadata.to_yaml()}\n---\n\n" + "\n".join(lines)


def _value(metrics: dict[str, float], name: str) -> str:
    return _number(metrics[name]) if name in metrics else ""


def push_folder(repo_id: str, folder: Path) -> str:
    """Upload `folder` to the Hub model repo `repo_id` (created if missing); returns the URL of
    the commit. Credentials as huggingface_hub finds them (HF_TOKEN, `hf auth login`)."""
    import huggingface_hub

    huggingface_hub.create_repo(repo_id, repo_type="model", exist_ok=True)
    commit = huggingface_hub.upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        repo_type="model",
        commit_message=f"Upload model trained with avgalign {__version__}",
    )
    return str(commit)
