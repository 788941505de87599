"""The baseline users build when Spark NLP is slow: a Spark Arrow pandas UDF around Hugging Face
`LongformerModel` (cached per worker), fixed batches of rows, torch eager fp32, no global attention,
mean note vectors (attention mask), written to Parquet."""
from __future__ import annotations

import numpy as np
import pandas as pd

BATCH_ROWS = 8
_CACHE: dict = {}


def _model(checkpoint: str):
    if checkpoint not in _CACHE:
        import torch
        from pyspark import TaskContext
        from transformers import AutoTokenizer, LongformerModel
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        ctx = TaskContext.get()
        torch.set_num_threads(max(1, int(ctx.cpus())) if ctx else 1)  # same threads as our tasks: a fair baseline
        _CACHE[checkpoint] = (AutoTokenizer.from_pretrained(checkpoint),
                              LongformerModel.from_pretrained(checkpoint, add_pooling_layer=False).eval())
    return _CACHE[checkpoint]


def embed_udf(checkpoint: str):
    """The pandas UDF (Series of texts -> Series of note vectors)."""
    from pyspark.sql.functions import pandas_udf

    @pandas_udf("array<float>")
    def embed(texts: pd.Series) -> pd.Series:
        import torch

        tok, model = _model(checkpoint)
        out = []
        for i in range(0, len(texts), BATCH_ROWS):
            chunk = [t if isinstance(t, str) else "" for t in texts.iloc[i:i + BATCH_ROWS]]
            enc = tok(chunk, padding=True, truncation=True, max_length=4096, return_tensors="pt")
            with torch.inference_mode():
                hidden = model(**enc).last_hidden_state
            m = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            out.extend(((hidden * m).sum(1) / m.sum(1).clamp(min=1)).numpy().astype(np.float32))
        return pd.Series([list(v) for v in out])

    return embed


def tokens_processed(checkpoint: str, texts: list[str]) -> int:
    """BPE pieces the baseline feeds its model (it truncates at 4,096, specials included)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(checkpoint)
    return sum(min(len(tok(t)["input_ids"]), 4096) for t in texts)
