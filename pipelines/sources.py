"""Note inputs: a Delta table path, Parquet, CSV (MIMIC-III NOTEEVENTS, multi-line quoted TEXT) or a table name."""
from __future__ import annotations

from pathlib import Path

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import types as T

ID_TYPES = (T.IntegerType, T.LongType, T.ShortType, T.StringType)


class InputError(Exception):
    """Bad input detected before any work starts; the message names the fix."""


def delta_spark_available(spark: SparkSession) -> bool:
    """True when delta-spark's JARs are on the classpath (Databricks, configured clusters)."""
    try:
        spark._jvm.java.lang.Class.forName("io.delta.tables.DeltaTable")
        return True
    except Exception:
        return False


def is_delta(path: str) -> bool:
    return (Path(path) / "_delta_log").is_dir() if "://" not in path else False


def _read_delta_rs(spark: SparkSession, path: str) -> DataFrame:
    """Plan the read with delta-rs (the table's current files), let Spark's executors read the Parquet."""
    from deltalake import DeltaTable

    dt = DeltaTable(path)
    files = dt.file_uris()
    if not files:
        import pyarrow as pa
        from pyspark.sql.pandas.types import from_arrow_schema

        return spark.createDataFrame([], from_arrow_schema(pa.schema(dt.schema().to_arrow())))
    return spark.read.option("basePath", path).parquet(*files)  # basePath: partition columns from the folders


CORRUPT = "_corrupt_record"


def _read_csv(spark: SparkSession, source: str) -> DataFrame:
    """MIMIC-style CSV: header, multi-line quoted fields, "" escapes, every column a string. Rows with
    too many or too few fields are kept and flagged in `_corrupt_record` (see select_notes)."""
    def reader():
        return (spark.read.option("header", True).option("multiLine", True).option("quote", '"')
                .option("escape", '"').option("mode", "PERMISSIVE"))

    header = reader().option("inferSchema", False).csv(source).columns
    schema = T.StructType([T.StructField(c, T.StringType()) for c in header] + [T.StructField(CORRUPT, T.StringType())])
    return reader().option("columnNameOfCorruptRecord", CORRUPT).schema(schema).csv(source)


def read_notes(spark: SparkSession, source: str, fmt: str = "auto") -> DataFrame:
    """Read a note table; `fmt` is auto, delta, parquet, csv or table."""
    path = Path(source)
    local_path = "://" not in source and ("/" in source or "\\" in source or path.suffix)
    if local_path and not path.exists():
        raise InputError(f"input {source} does not exist; pass a Delta, Parquet or CSV path or a table name")
    if fmt == "auto":
        if is_delta(source):
            fmt = "delta"
        elif path.suffix.lower() == ".csv" or (path.is_dir() and any(path.glob("*.csv"))):
            fmt = "csv"
        elif path.suffix.lower() == ".parquet" or (path.is_dir() and any(path.glob("*.parquet"))):
            fmt = "parquet"
        elif path.exists():
            raise InputError(f"cannot tell the format of {source}; pass --input-format delta|parquet|csv")
        elif "/" not in source and "\\" not in source:
            fmt = "table"
        else:
            raise InputError(f"input {source} does not exist; pass a Delta, Parquet or CSV path or a table name")
    if fmt == "delta":
        return spark.read.format("delta").load(source) if delta_spark_available(spark) else _read_delta_rs(spark, source)
    if fmt == "parquet":
        return spark.read.parquet(source)
    if fmt == "csv":
        return _read_csv(spark, source)
    if fmt == "table":
        try:
            return spark.table(source)
        except Exception:
            raise InputError(f"table {source} was not found; pass an existing table name or a path") from None
    raise InputError(f"unknown input format {fmt!r}; use delta, parquet, csv or table")


def select_notes(df: DataFrame, id_col: str, text_col: str, id_type: str = "auto", keep: tuple[str, ...] = ()) -> DataFrame:
    """Check the id and text columns up front and return (note_id, text, input_error).

    `id_type`: auto keeps the id's type (integers widened to long); long or string casts it.
    """
    from pyspark.sql import functions as F

    names = {f.name: f.dataType for f in df.schema.fields}
    for col, flag in ((id_col, "--id-col"), (text_col, "--text-col"), *((k, "--partition-by") for k in keep)):
        if col not in names:
            raise InputError(f"input has no column {col!r} (columns: {', '.join(sorted(names))}); set {flag}")
    if not isinstance(names[id_col], ID_TYPES):
        raise InputError(f"id column {id_col!r} has type {names[id_col].simpleString()}; use an integer or string column")
    if not isinstance(names[text_col], (T.StringType, T.BinaryType)):
        raise InputError(f"text column {text_col!r} has type {names[text_col].simpleString()}, not string; set --text-col")
    note_id = F.col(id_col)
    if id_type == "long" or (id_type == "auto" and not isinstance(names[id_col], T.StringType)):
        note_id = note_id.cast("long")
    elif id_type == "string":
        note_id = note_id.cast("string")
    return df.select(note_id.alias("note_id"), F.col(text_col).alias("text"), input_errors(df, text_col),
                     *(F.col(k).cast("string").alias(k) for k in keep))


def input_errors(df: DataFrame, text_col: str):
    """`input_error`: why a row read from the source is unusable, else null. CSV rows with the wrong field
    count, and text that opens with a quote it never closes (an unbalanced quote: the parser has swallowed
    the following lines, so the rows it ate cannot be told apart)."""
    from pyspark.sql import functions as F

    if CORRUPT not in df.columns:
        return F.lit(None).cast("string").alias("input_error")
    text = F.col(text_col)
    quotes = F.length(text) - F.length(F.regexp_replace(text, '"', ""))
    return (F.when(F.col(CORRUPT).isNotNull(), F.lit("malformed CSV row (wrong number of fields)"))
            .when(text.startswith('"') & (quotes % 2 == 1),
                  F.lit("malformed CSV row (unbalanced quote; following lines were merged into it)"))
            .alias("input_error"))
