"""The registered model: an MLflow pyfunc over a KAT checkpoint directory.

Logged as MLflow "models from code": MLflow stores this file with the model and executes it when
`mlflow.pyfunc.load_model("models:/kat@champion")` runs, so nothing is pickled. The checkpoint directory is
the model's artifact `checkpoint`, byte for byte (HF weights, tokenizer, MTP heads, manifest), and is
verified against its manifest before it is loaded. Loading needs `kat_core` installed, as the platform's
image has it.

`predict(["12+7=?", ...], params={"max_new_tokens": 64})` (or a DataFrame with a "prompt" column) -> the
raw greedy completions with their grammar tags (`<judge>…</judge><think_off><answer>…</answer>`), which
`kat_core.format.parse` splits.
"""

from __future__ import annotations

from typing import Any

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel

CHECKPOINT_ARTIFACT = "checkpoint"
DEFAULT_MAX_NEW_TOKENS = 128


class KatCheckpointModel(PythonModel):
    def load_context(self, context) -> None:
        from kat_core.errors import KatError
        from kat_core.manifest import verify_manifest
        from kat_core.model.checkpoint import load_checkpoint

        path = context.artifacts[CHECKPOINT_ARTIFACT]
        # exact: a file added beside the listed ones (a chat template) would change what loads just as well
        problems = verify_manifest(path, exact=True)
        if problems:  # a registry artifact that changed after registration must not be served
            raise KatError(f"registered checkpoint {path} does not match its manifest: {problems[0]}")
        self.model, self.tokenizer, _ = load_checkpoint(path)
        self.model.eval()

    # typed as a DataFrame, a hint MLflow infers no signature from: a list[str] hint would replace the
    # registry's explicit signature and lose its params schema (max_new_tokens)
    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> list[str]:
        import torch

        from kat_core.chat import request_text

        prompts = _prompts(model_input)
        max_new = int((params or {}).get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS))
        tok = self.tokenizer
        stop = {tok.eos_token_id, tok.pad_token_id} - {None}
        limit = getattr(self.model.config, "max_position_embeddings", None)
        out = []
        # one prompt at a time: no padding to get wrong, and the registry check only needs a few prompts
        for prompt in prompts:
            ids = tok(request_text(tok, prompt), return_tensors="pt", add_special_tokens=False)
            room = max_new if limit is None else max(1, min(max_new, limit - ids["input_ids"].shape[1]))
            with torch.no_grad():
                gen = self.model.generate(**ids, max_new_tokens=room, do_sample=False,
                                          pad_token_id=tok.pad_token_id)
            new = gen[0, ids["input_ids"].shape[1]:].tolist()
            cut = next((i for i, t in enumerate(new) if t in stop), len(new))
            out.append(tok.decode(new[:cut], skip_special_tokens=False))
        return out


def _prompts(model_input) -> list[str]:
    """MLflow hands over a DataFrame (from the signature); a plain list or a single string also work."""
    if isinstance(model_input, str):
        return [model_input]
    if hasattr(model_input, "columns"):
        column = "prompt" if "prompt" in model_input.columns else model_input.columns[0]
        return [str(p) for p in model_input[column].tolist()]
    return [str(p) for p in model_input]


mlflow.models.set_model(KatCheckpointModel())
