"""The one-liner, in the style of nlu: `pipelines.load("en.embed.longformer.clinical").predict(x)`.

A string or a small list is answered in-process, without a Spark job (like Spark NLP's
LightPipeline); larger pandas input and Spark DataFrames run through Spark. Both paths run the same
engine and table builder, so they return the same numbers.

Every input is accounted for: `predict` returns its rows in input order, and an input that cannot be
embedded (null, NaN, empty, blank, NUL bytes, too long, no BPE piece) gives one row with a null vector
and its reason in `skip_reason` (the reason the job's errors table gives); a token or sentence that no
BPE piece covers has a null vector and `skip_reason` engine.TOKEN_NO_PIECE / SENTENCE_NO_PIECE.
"""

from __future__ import annotations

from dataclasses import fields, replace

import pandas as pd
import pyarrow as pa

from clinlong.pipelines.core.artifact import Artifact
from clinlong.pipelines.core.engine import EmbedOptions
from clinlong.pipelines.core.options import check_choice
from clinlong.pipelines.core.registry import resolve
from clinlong.pipelines.core.schema import OutputSpec, build_table, table_schema

OUTPUT_LEVELS = {"token": "token", "sentence": "sentence", "document": "note", "note": "note"}
IN_PROCESS_LIMIT = 256  # texts answered without Spark
PROGRESS_FROM = 32  # in-process predict on at least this many texts shows a progress bar
CHUNK = 16


class EmbeddingsPipeline:
    """Embeds texts with one artifact; `predict` returns one row per token, sentence or note."""

    def __init__(self, artifact: Artifact, options: EmbedOptions = EmbedOptions()):
        self.artifact = artifact
        self.options = options.validate(artifact)

    def _granularity(self, output_level: str) -> str:
        check_choice("output_level", output_level, sorted(OUTPUT_LEVELS))
        return OUTPUT_LEVELS[output_level]

    def predict(
        self,
        data,
        output_level: str = "token",
        text_col: str = "text",
        id_col: str | None = None,
        context: str | None = None,
    ):
        """Embed `data` (str, list of str, pandas or Spark DataFrame); pandas out, Spark out for Spark in.

        Columns: those of the job's table at that level (`note_id` is the list position or the pandas index
        where no `id_col` is given), plus `skip_reason` (string, null where embedded). Rows come in input
        order; each input gives at least one row. Raises ValueError for an unknown output level or a
        missing column, TypeError for another type of `data`."""
        granularity = self._granularity(output_level)
        options = replace(self.options, context=context) if context else self.options
        return self._predict(data, text_col, id_col, options, lambda id_type: self._spec(granularity, id_type, options))

    def _predict(self, data, text_col: str, id_col: str | None, options: EmbedOptions, make_spec):
        """`predict`'s body: `make_spec(id_type)` gives the output table's OutputSpec."""
        if isinstance(data, str):
            data = [data]
        if isinstance(data, (list, tuple)):
            data = pd.DataFrame({text_col: list(data)})
        if isinstance(data, pd.DataFrame):
            if text_col not in data.columns:
                raise ValueError(f"the DataFrame has no {text_col!r} column; pass text_col=")
            if id_col and id_col not in data.columns:
                raise ValueError(f"the DataFrame has no {id_col!r} column; pass id_col=")
            ids = data[id_col].tolist() if id_col else data.index.tolist()
            texts = [None if _missing(t) else t for t in data[text_col].tolist()]  # NaN, pd.NA, NaT: null text
            if len(data) <= IN_PROCESS_LIMIT:
                return self._in_process(ids, texts, make_spec, options)
            import os
            import sys

            from pyspark.sql import SparkSession

            from clinlong.pipelines.spark.java import ensure_java

            os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
            if SparkSession.getActiveSession() is None:
                ensure_java()
            spark = SparkSession.builder.getOrCreate()
            sdf = spark.createDataFrame(
                pd.DataFrame({"note_id": ids, "text": pd.Series(texts, dtype=object)}), schema=_text_schema(ids)
            )
            return arrow_to_pandas(self._spark(sdf, make_spec, options).toArrow())
        try:
            from pyspark.sql import DataFrame as SparkDataFrame
        except ImportError:  # pragma: no cover
            SparkDataFrame = ()
        if isinstance(data, SparkDataFrame):
            from pyspark.sql import functions as F

            if not id_col:  # row positions (monotonically_increasing_id) change when Spark re-evaluates
                raise ValueError(
                    "a Spark DataFrame needs id_col= naming a column that identifies each row, "
                    "so that output rows can be joined back to it"
                )
            return self._spark(
                data.select(F.col(id_col).alias("note_id"), F.col(text_col).alias("text")), make_spec, options
            )
        raise TypeError(
            f"predict takes a string, a list of strings, a pandas or a Spark DataFrame, not {type(data).__name__}"
        )

    def _in_process(
        self, ids: list, texts: list, make_spec, options: EmbedOptions, progress: bool | None = None
    ) -> pd.DataFrame:
        from tqdm import tqdm  # the text bar: tqdm.auto warns in notebooks without ipywidgets

        from clinlong.pipelines.core.batches import embed_texts, embedder
        from clinlong.pipelines.core.head_runs import engine_class

        spec = make_spec(pa.array(ids).type if ids else pa.int64())
        emb = embedder(str(self.artifact.path), options, engine_class(spec.task))  # as embed_rows chooses it
        show = progress if progress is not None else len(texts) >= PROGRESS_FROM
        bar = tqdm(total=len(texts), desc="[predict]", unit=" notes", disable=not show)  # counts only, no text
        tables = []
        for i in range(0, max(len(texts), 1), CHUNK):
            chunk_ids, chunk_texts = ids[i : i + CHUNK], texts[i : i + CHUNK]
            tables.append(build_table(spec, chunk_ids, chunk_texts, embed_texts(emb, chunk_texts, chunk_ids)))
            bar.update(len(chunk_texts))
        bar.close()
        return arrow_to_pandas(pa.concat_tables(tables))

    def _spec(self, granularity: str, id_type: pa.DataType, options: EmbedOptions) -> OutputSpec:
        return OutputSpec(
            granularity,
            table_schema(granularity, id_type, skip_reasons=True),
            self.artifact.model_id,
            self.artifact.dimension,
            options.token_vector,
        )

    def _spark(self, sdf, make_spec, options: EmbedOptions):
        from pyspark.sql.pandas.types import from_arrow_schema, to_arrow_type

        from clinlong.pipelines.spark.tasks import embed_rows

        spec = make_spec(to_arrow_type(sdf.schema["note_id"].dataType))
        return sdf.mapInArrow(embed_rows(str(self.artifact.path), options, spec), from_arrow_schema(spec.schema))


class HeadPipeline(EmbeddingsPipeline):
    """A fine-tuned head's one-liner (`load("en.classify.longformer.NAME")`, `load("en.ner.longformer.NAME")`, or
    the path of such an export): `predict` gives the job's `--task classify` or `--task ner` table. The encoder
    runs with the head's own global attention (Longformer's sequence head: on `<s>`)."""

    def __init__(self, artifact: Artifact, options: EmbedOptions = EmbedOptions()):
        from clinlong.pipelines.core.head_runs import TASK_KINDS

        head = artifact.head
        if head is None:
            raise ValueError(f"{artifact.path} holds an embedding model with no fine-tuned head; use load() for it")
        self.task = next(task for task, kind in TASK_KINDS.items() if kind == head.kind)
        super().__init__(artifact, replace(options, global_attention=head.global_attention))

    def predict(
        self,
        data,
        text_col: str = "text",
        id_col: str | None = None,
        context: str | None = None,
        window_pooling: str = "mean",
    ):
        """Classify `data` (one row per input: `label`, `scores`, `labels`, `n_windows`) or find its entities (one
        row per entity chunk: `chunk_index`, `begin`, `end` inclusive, `chunk`, `entity`, `score`; one row with
        those null for an input with none): the job's tables (README, "Classifying notes and finding entities"),
        plus `skip_reason` (string, null where run): an input that cannot be run gives one row with its reason.
        `data` as for embeddings (str, list of str, pandas or Spark DataFrame; pandas out, Spark out for Spark in);
        `window_pooling` (mean, max): how a long text's windows' logits are combined (classification). Rows
        come in input order. Raises ValueError for a missing column, a sentence context for classification or
        another window pooling; TypeError for another type of `data`."""
        from clinlong.pipelines.core.heads import WINDOW_POOLINGS
        from clinlong.pipelines.core.schema import head_table_schema

        check_choice("window_pooling", window_pooling, WINDOW_POOLINGS)
        options = replace(self.options, context=context) if context else self.options
        if self.task == "classify" and options.context != "note":
            raise ValueError("classification labels whole texts: context='note' (long texts run as windows)")

        def make_spec(id_type: pa.DataType) -> OutputSpec:
            schema = head_table_schema(self.task, id_type, skip_reasons=True)
            return OutputSpec(
                "note",
                schema,
                self.artifact.model_id,
                self.artifact.dimension,
                task=self.task,
                head=self.artifact.head,
                window_pooling=window_pooling,
            )

        return self._predict(data, text_col, id_col, options, make_spec)


def _missing(value) -> bool:
    """True for pandas' and numpy's missing values (None, NaN, pd.NA, NaT): a null text."""
    try:
        return value is None or bool(pd.isna(value))
    except (TypeError, ValueError):  # arrays and the like: not a missing scalar
        return False


def _text_schema(ids: list):
    """(note_id, text) for Spark: the ids' type as Arrow infers it, text a string (an all-null column too)."""
    from pyspark.sql import types as T
    from pyspark.sql.pandas.types import from_arrow_type

    id_type = from_arrow_type(pa.array(ids).type) if ids else T.LongType()
    return T.StructType([T.StructField("note_id", id_type), T.StructField("text", T.StringType())])


# Integer columns stay integers where a skipped input's row holds nulls (begin, end, indices): pandas' nullable
# dtypes, so `text[begin:end + 1]` works on every embedded row instead of failing on float64.
_NULLABLE_INTEGERS = {
    pa.int8(): pd.Int8Dtype(),
    pa.int16(): pd.Int16Dtype(),
    pa.int32(): pd.Int32Dtype(),
    pa.int64(): pd.Int64Dtype(),
}


def arrow_to_pandas(table: pa.Table) -> pd.DataFrame:
    """`predict`'s pandas frame: Arrow integer columns as nullable pandas integers, the rest as usual."""
    return table.to_pandas(types_mapper=_NULLABLE_INTEGERS.get)


def load(name: str = "en.embed.longformer.clinical", lang: str = "en", **options) -> EmbeddingsPipeline:
    """Resolve `name` (an nlu-style reference, a registered name or an artifact path) to a pipeline: a
    HeadPipeline (classification or NER) for the export of a fine-tuned head, else an EmbeddingsPipeline. An
    nlu-style name says which it expects: `LANG.classify.FAMILY.NAME` a sequence head, `LANG.ner.FAMILY.NAME` a
    token head, `LANG.embed.…` embeddings (a fine-tuned export embeds too, with its fine-tuned encoder).
    `options` are EmbedOptions' fields (max_length, case_sensitive, window_overlap, ...), checked here:
    a value that is refused raises ValueError naming the option; a name whose task the artifact cannot do
    raises ArtifactError."""
    from clinlong.pipelines.core.head_runs import TASK_KINDS, check_head

    known = [f.name for f in fields(EmbedOptions)]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(unknown)}; load() takes: {', '.join(known)}")
    artifact = Artifact.open(resolve(name, lang))
    task = name.split(".")[1] if name.count(".") >= 2 else ""
    if task in TASK_KINDS:
        check_head(artifact, TASK_KINDS[task], f"load({name!r})")
    if artifact.head is not None and task != "embed":
        return HeadPipeline(artifact, EmbedOptions(**options))
    return EmbeddingsPipeline(artifact, EmbedOptions(**options))
