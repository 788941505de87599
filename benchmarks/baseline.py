"""The baseline users build when Spark NLP is slow: a Spark Arrow pandas UDF around Hugging Face
`LongformerModel` (cached per worker), fixed batches of rows, torch eager fp32, no global attention,
mean note vectors (attention mask), written to Parquet."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

BATCH_ROWS = 8
HF_SORTED_TOKENS = 32768  # Hugging Face's length-sorted batches (in-process runs): at most this many padded tokens
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
        _CACHE[checkpoint] = (
            AutoTokenizer.from_pretrained(checkpoint),
            LongformerModel.from_pretrained(checkpoint, add_pooling_layer=False).eval(),
        )
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
            chunk = [t if isinstance(t, str) else "" for t in texts.iloc[i : i + BATCH_ROWS]]
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


def _hf_batches(lengths: list[int], sort: bool) -> list[list[int]]:
    """BATCH_ROWS-row batches in table order, or length-sorted batches of at most HF_SORTED_TOKENS padded tokens."""
    if not sort:
        return [list(range(i, min(i + BATCH_ROWS, len(lengths)))) for i in range(0, len(lengths), BATCH_ROWS)]
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches, current = [], []
    for i in order:
        if current and (len(current) + 1) * lengths[current[0]] > HF_SORTED_TOKENS:
            batches.append(current)
            current = []
        current.append(i)
    return batches + ([current] if current else [])


def hf_run(ckpt: Path, sequences: list[np.ndarray], device: str, precision: str, sort: bool) -> tuple[float, list]:
    """Hugging Face LongformerModel eager on the sequences (each note's windows as the pipeline cuts them)."""
    import torch
    from transformers import LongformerModel

    from clinlong.benchmarks.measure import Clock

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    model = LongformerModel.from_pretrained(str(ckpt), add_pooling_layer=False).to(device, dtype).eval()
    pad = model.config.pad_token_id
    lengths = [len(s) for s in sequences]
    out: list = [None] * len(sequences)
    with torch.inference_mode():
        ids = torch.from_numpy(sequences[0][:16])[None].to(device)
        model(input_ids=ids, attention_mask=torch.ones_like(ids))  # warm-up
        with Clock(device) as clock:
            for batch in _hf_batches(lengths, sort):
                width = max(lengths[i] for i in batch)
                ids = torch.full((len(batch), width), pad, dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                for r, i in enumerate(batch):
                    ids[r, : lengths[i]] = torch.from_numpy(sequences[i])
                    mask[r, : lengths[i]] = 1
                hidden = model(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
                if precision == "fp32":  # the reference: kept for the cosine of every other row
                    for r, i in enumerate(batch):
                        out[i] = hidden[r, : lengths[i]].float().cpu().numpy()
    del model
    return clock.seconds, out
