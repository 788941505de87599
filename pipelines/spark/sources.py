"""Note inputs as Spark users name them: catalog tables (`db.table`, `catalog.schema.table`), Delta
tables by path, Parquet or CSV (MIMIC-III NOTEEVENTS, multi-line quoted TEXT) at any URI Spark reads
(`s3a://`, `s3://`, `abfss://`, `gs://`, `dbfs:/`, `/Volumes/…`, `file:`, local paths).

What an input is, is asked of the catalog, the Delta log and Spark's own filesystem, never guessed from
the local disk alone; what identifies its data (the run fingerprint) is the Delta version or Spark's
file listing. Delta tables are read by delta-spark where it is on the classpath, else planned with
delta-rs (`DeltaTable.to_pyarrow_dataset`, which refuses the reader features it cannot honour, such as
deletion vectors, instead of returning rows they removed) and read file by file in Spark's executors.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import types as T

from clinlong.pipelines.core.config import INPUT_FORMATS
from clinlong.pipelines.core.errors import InputError  # noqa: F401 - re-exported: defined in core.errors
from clinlong.pipelines.core.storage import StorageError, delta_rs_uri, is_local, local_path, open_table, scheme

ID_TYPES = (T.IntegerType, T.LongType, T.ShortType, T.StringType)
CORRUPT = "_corrupt_record"
_IDENT = r"(`[^`]+`|[A-Za-z_][\w$]*)"
TABLE_NAME = re.compile(rf"^{_IDENT}(\.{_IDENT}){{0,2}}$")  # table, db.table, catalog.schema.table
_READ_BATCH_ROWS = 256  # rows per Arrow batch read from a Delta file (notes are up to megabytes each)


def delta_spark_available(spark: SparkSession) -> bool:
    """True when delta-spark's JARs are on the classpath (Databricks, configured clusters)."""
    return jvm_has(spark, "io.delta.tables.DeltaTable")


def jvm_has(spark: SparkSession, name: str) -> bool:
    """True when Spark's class loader (the one that sees spark.jars and --packages, unlike py4j's
    Class.forName) finds class `name`."""
    try:
        spark._jvm.org.apache.spark.util.Utils.classForName(name, False, False)
        return True
    except Exception:  # noqa: BLE001 - ClassNotFoundException through py4j
        return False


@dataclass(frozen=True)
class Source:
    """A resolved input: what the user named, how to read it, and the storage options for delta-rs."""

    name: str
    kind: str  # delta | parquet | csv | table
    storage_options: dict = field(default_factory=dict, compare=False)


def resolve(spark: SparkSession, name: str, fmt: str = "auto", storage_options: dict | None = None) -> Source:
    """Decide how to read `name`: the catalog for table names, the Delta log, then Spark's listing."""
    opts = storage_options or {}
    if fmt not in INPUT_FORMATS:
        raise InputError(f"unknown input format {fmt!r}; use one of {', '.join(INPUT_FORMATS)}")
    if fmt != "auto":
        if fmt == "table" and not _table_exists(spark, name):
            raise InputError(
                f"table {name} was not found in Spark's catalog ({_catalog_where(spark)}); "
                "pass an existing table name or a path"
            )
        if fmt == "delta" and not is_delta(spark, name, opts):
            raise InputError(f"{name} is not a Delta table (no _delta_log); pass --input-format parquet|csv")
        return Source(name, fmt, opts)
    local = is_local(name) and Path(local_path(name)).exists()
    if not local and not scheme(name) and TABLE_NAME.match(name) and _table_exists(spark, name):
        return Source(name, "table", opts)
    if is_delta(spark, name, opts):
        return Source(name, "delta", opts)
    if not local and not scheme(name) and "/" not in name and "\\" not in name:
        raise InputError(
            f"no table or path named {name}: Spark's catalog ({_catalog_where(spark)}) has no such "
            "table and no such file exists; pass a table name, a path or a URI"
        )
    return Source(name, _format_from_listing(spark, name), opts)


def is_delta(spark: SparkSession, uri: str, options: dict | None = None) -> bool:
    """True when `uri` holds a Delta log: asked of Spark's filesystem, else (a scheme Spark has no
    filesystem for, such as s3a:// without hadoop-aws) of delta-rs."""
    if is_local(uri):
        return (Path(local_path(uri)) / "_delta_log").is_dir()
    try:
        fs, path = _hadoop(spark, uri)
    except InputError as spark_says:
        try:
            from deltalake import DeltaTable

            return DeltaTable.is_deltatable(delta_rs_uri(uri), options or None)
        except StorageError:
            raise spark_says from None
        except Exception as e:  # noqa: BLE001 - neither could open it: say both, in one line
            raise InputError(
                f"{spark_says}; delta-rs could not open it either: {_first_line(e)} (set AWS_*, "
                "AZURE_* or GOOGLE_* environment variables or --storage-option KEY=VALUE)"
            ) from None
    try:
        return bool(fs.exists(spark._jvm.org.apache.hadoop.fs.Path(path, "_delta_log")))
    except Exception as e:  # noqa: BLE001 - e.g. access denied
        raise InputError(f"Spark cannot open {uri}: {_java_message(e)}") from None


def _hadoop(spark: SparkSession, uri: str):
    """Spark's own Hadoop filesystem for `uri` and the Path in it; a one-line error when Spark has none."""
    jvm = spark._jvm
    try:
        path = jvm.org.apache.hadoop.fs.Path(uri)
        return path.getFileSystem(spark._jsc.hadoopConfiguration()), path
    except Exception as e:  # noqa: BLE001 - py4j wraps the Java exception
        hint = (
            f" (Spark needs the hadoop-aws JAR for s3a://: --packages {_hadoop_aws()}; python -m adds it itself)"
            if scheme(uri) in ("s3a", "s3", "s3n")
            else ""
        )
        raise InputError(f"Spark cannot open {uri}: {_java_message(e)}{hint}") from None


def _hadoop_aws() -> str:
    """hadoop-aws' coordinates for the installed pyspark (pipelines.spark.jars), or its name where they cannot
    be told."""
    from clinlong.pipelines.spark.jars import JarError, coordinates

    try:
        return coordinates(("s3a",))[0]
    except JarError:
        return "org.apache.hadoop:hadoop-aws (the Hadoop version of Spark's jars/)"


def _format_from_listing(spark: SparkSession, uri: str) -> str:
    """csv or parquet, from the name of the path or of the data files under it, as Spark lists them."""
    fs, path = _hadoop(spark, uri)
    try:
        status = fs.getFileStatus(path)
    except Exception as e:  # noqa: BLE001
        raise InputError(
            f"input {uri} does not exist ({_java_message(e)}); pass a Delta, Parquet or CSV path, a URI or a table name"
        ) from None
    names = [path.getName()]
    if status.isDirectory():
        files, names = fs.listFiles(path, True), []
        while files.hasNext() and len(names) < 1000:
            name = files.next().getPath().getName()
            if not name.startswith(("_", ".")):
                names.append(name)
    for fmt, suffixes in (("csv", (".csv", ".csv.gz", ".csv.bz2")), ("parquet", (".parquet",))):
        if any(n.lower().endswith(suffixes) for n in names):
            return fmt
    raise InputError(f"cannot tell the format of {uri}; pass --input-format delta|parquet|csv")


def _table_exists(spark: SparkSession, name: str) -> bool:
    try:
        return bool(spark.catalog.tableExists(name))
    except Exception:  # noqa: BLE001 - an unknown catalog or database: the table is not there
        return False


def _catalog_where(spark: SparkSession) -> str:
    try:
        return f"current catalog {spark.catalog.currentCatalog()}, database {spark.catalog.currentDatabase()}"
    except Exception:  # noqa: BLE001
        return "the session's catalog"


def read(spark: SparkSession, src: Source, columns: list[str] | None = None) -> DataFrame:
    """The input as a DataFrame (Delta through delta-spark when present, else delta-rs in executors)."""
    if src.kind == "table":
        return spark.table(src.name)
    if src.kind == "delta":
        if delta_spark_available(spark):
            return spark.read.format("delta").load(src.name)
        return read_delta_rs(spark, src.name, src.storage_options, columns)
    try:
        return _read_csv(spark, src.name) if src.kind == "csv" else spark.read.parquet(src.name)
    except Exception as e:  # noqa: BLE001 - AnalysisException: path missing, no filesystem for the scheme
        raise InputError(f"Spark cannot read {src.name} as {src.kind}: {_java_message(e)}") from None


def read_notes(spark: SparkSession, source: str, fmt: str = "auto", storage_options: dict | None = None) -> DataFrame:
    """Read a note table by name, path or URI; `fmt` is auto, delta, parquet, csv or table."""
    return read(spark, resolve(spark, source, fmt, storage_options))


def read_delta_rs(
    spark: SparkSession, uri: str, options: dict | None = None, columns: list[str] | None = None
) -> DataFrame:
    """A Delta table planned by delta-rs on the driver (one version, its files) and read by Spark's
    executors, one task per few files, through the same delta-rs dataset (partition values included)."""
    from deltalake.exceptions import DeltaProtocolError
    from pyspark.sql.pandas.types import from_arrow_schema

    opts = dict(options or {})
    dt = open_table(uri, opts)
    if dt is None:
        raise InputError(f"no Delta table at {uri}")
    try:
        dataset = dt.to_pyarrow_dataset()
    except DeltaProtocolError as e:
        raise InputError(
            f"delta-rs cannot read {uri} faithfully ({_first_line(e)}); read it with delta-spark "
            "(a cluster with delta-spark on the classpath) or rewrite it without that feature"
        ) from None
    schema = dataset.schema if columns is None else _select(dataset.schema, columns)
    spark_schema = from_arrow_schema(schema)
    paths = [f.path for f in dataset.get_fragments()]
    if not paths:
        return spark.createDataFrame([], spark_schema)
    version, names = dt.version(), schema.names
    files = spark.createDataFrame([(p,) for p in paths], "path string")
    files = files.repartition(min(len(paths), 4 * spark.sparkContext.defaultParallelism))

    def scan(batches):
        import pyarrow.dataset as pds

        ds = open_table(uri, opts, version).to_pyarrow_dataset()
        by_path = {f.path: f for f in ds.get_fragments()}
        for b in batches:
            for p in b.column(0).to_pylist():
                one = pds.FileSystemDataset([by_path[p]], ds.schema, ds.format, ds.filesystem)
                yield from one.to_batches(columns=names, batch_size=_READ_BATCH_ROWS)

    return files.mapInArrow(scan, spark_schema)


def _select(schema, columns: list[str]):
    import pyarrow as pa

    return pa.schema([schema.field(c) for c in columns if c in schema.names])


def fingerprint(spark: SparkSession, src: Source, df: DataFrame) -> list:
    """What identifies the input's data: a Delta table's version (by path, or by catalog name through
    delta-spark), else Spark's own listing of its files (names, sizes, modification times). A table that
    gains rows therefore makes a new run, under any scheme."""
    if src.kind == "delta":
        version = _delta_version(spark, src)
        if version is not None:
            return ["delta", src.name, version]
    if src.kind == "table" and delta_spark_available(spark):
        try:
            return ["delta", src.name, int(spark.sql(f"DESCRIBE HISTORY {src.name} LIMIT 1").first()["version"])]
        except Exception:  # noqa: BLE001 - not a Delta table: its files identify it
            pass
    files = df.inputFiles()
    if not files:
        return [src.kind, src.name, []]
    listing = (
        spark.read.format("binaryFile")
        .option("recursiveFileLookup", "true")
        .load(files)
        .select("path", "length", "modificationTime")
        .collect()
    )
    return [src.kind, src.name, sorted([r["path"], r["length"], r["modificationTime"].isoformat()] for r in listing)]


def _delta_version(spark: SparkSession, src: Source) -> int | None:
    try:
        dt = open_table(src.name, src.storage_options)
        return None if dt is None else dt.version()
    except StorageError:  # dbfs: and the like: Spark's Delta log
        if delta_spark_available(spark):
            return int(spark.sql(f"DESCRIBE HISTORY delta.`{src.name}` LIMIT 1").first()["version"])
        return None


def _quiet_multichar_linesep_warning(spark: SparkSession) -> None:
    """Spark warns on every read that a two-character `lineSep` ("\r\n") is "not recommended ... within
    quotes"; for MIMIC's CRLF files it is the setting that keeps quoted text as stored, which the tests check
    (tests/test_cases_2026_11_29.py), so the warning is noise to the user. Best effort (classic Spark only)."""
    try:
        jvm = spark.sparkContext._jvm
        jvm.org.apache.logging.log4j.core.config.Configurator.setLevel(
            "org.apache.spark.sql.catalyst.csv.CSVOptions", jvm.org.apache.logging.log4j.Level.ERROR
        )
    except Exception:  # noqa: BLE001 - Spark Connect or another logging backend: the warning stays
        pass


def _read_csv(spark: SparkSession, source: str) -> DataFrame:
    """MIMIC-style CSV: header, multi-line quoted fields, "" escapes, every column a string. Rows with
    too many or too few fields are kept and flagged in `_corrupt_record` (see select_notes).

    The text is kept as stored: Spark's multi-line CSV reader turns each line ending inside a quoted field
    that is not its record separator into "\n" (CRLF files lose their "\r"s) unless `lineSep` names the
    separator, so it is set to the one the files use (record_separator); a UTF-8 byte-order mark before
    the header is dropped by Spark, never part of a field."""
    sep = record_separator(spark, source)
    if sep and len(sep) > 1:
        _quiet_multichar_linesep_warning(spark)

    def reader():
        r = (
            spark.read.option("header", True)
            .option("multiLine", True)
            .option("quote", '"')
            .option("escape", '"')
            .option("mode", "PERMISSIVE")
        )
        return r.option("lineSep", sep) if sep else r

    header = reader().option("inferSchema", False).csv(source).columns
    schema = T.StructType([T.StructField(c, T.StringType()) for c in header] + [T.StructField(CORRUPT, T.StringType())])
    return reader().option("columnNameOfCorruptRecord", CORRUPT).schema(schema).csv(source)


SNIFF_BYTES = 1 << 16  # bytes read from the start of each CSV file to find its record separator


def line_ending(head: bytes) -> str | None:
    """The record separator of a CSV file from its first bytes: the line ending of its first record (the
    header), found outside quotes: "\r\n", "\n" or "\r"; None when the bytes hold no complete record
    (a BOM is skipped)."""
    quoted = False
    data = head[3:] if head.startswith(b"\xef\xbb\xbf") else head
    for i, byte in enumerate(data):
        if byte == 0x22:
            quoted = not quoted
        elif not quoted and byte in (0x0A, 0x0D):
            if byte == 0x0A:
                return "\n"
            if i + 1 < len(data):
                return "\r\n" if data[i + 1] == 0x0A else "\r"
            return None  # a CR as the last byte read: CR or CRLF, cannot tell
    return None


def record_separator(spark: SparkSession, source: str) -> str | None:
    """The one record separator of the CSV files at `source` (a file or a folder, as Spark lists it), read
    from the first SNIFF_BYTES of each file (decompressed by Hadoop's codecs: .gz, .bz2); None when no
    file holds a complete record. Raises InputError, in one line, when the files use different ones:
    Spark's reader takes one `lineSep`, and any other would be rewritten inside quoted text."""
    try:
        fs, path = _hadoop(spark, source)
        status = fs.getFileStatus(path)
    except Exception:  # noqa: BLE001 - Spark's read reports the missing path in its own words
        return None
    jvm = spark._jvm
    paths = [path]
    if status.isDirectory():
        files, paths = fs.listFiles(path, True), []
        while files.hasNext() and len(paths) < 10_000:
            p = files.next().getPath()
            if not p.getName().startswith(("_", ".")):
                paths.append(p)
    codecs = jvm.org.apache.hadoop.io.compress.CompressionCodecFactory(spark._jsc.hadoopConfiguration())
    found: dict[str, str] = {}
    for p in paths:
        stream = fs.open(p)
        try:
            codec = codecs.getCodec(p)
            head = bytes((codec.createInputStream(stream) if codec is not None else stream).readNBytes(SNIFF_BYTES))
        finally:
            stream.close()
        sep = line_ending(head)
        if sep is not None:
            found.setdefault(sep, p.getName())
    if len(found) > 1:
        names = ", ".join(f"{_SEP_NAMES[k]} in {v}" for k, v in found.items())
        raise InputError(
            f"CSV files at {source} end their records differently ({names}); Spark's CSV reader keeps "
            "line endings inside quoted text only with one record separator (its lineSep option): "
            "convert the files to one line-ending style, or to Parquet"
        )
    return next(iter(found), None)


_SEP_NAMES = {"\r\n": "CRLF", "\n": "LF", "\r": "CR"}


def _java_message(e: Exception) -> str:
    """The first line of a (py4j-wrapped) Java exception's message, without the stack."""
    java = getattr(e, "java_exception", None)
    msg = java.toString() if java is not None else str(e)
    return _first_line(msg)


def _first_line(e) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


def select_notes(
    df: DataFrame, id_col: str, text_col: str, id_type: str = "auto", keep: tuple[str, ...] = ()
) -> DataFrame:
    """Check the id and text columns up front and return (note_id, text, input_error).

    `id_type`: auto keeps the id's type (integers widened to long); long or string casts it.
    """
    from pyspark.sql import functions as F

    names = {f.name: f.dataType for f in df.schema.fields}
    for col, flag in ((id_col, "--id-col"), (text_col, "--text-col"), *((k, "--partition-by") for k in keep)):
        if col not in names:
            shown = ", ".join(sorted(n for n in names if n != CORRUPT))  # (the CSV reader's own column is not one)
            raise InputError(f"input has no column {col!r} (columns: {shown}); set {flag}")
    if not isinstance(names[id_col], ID_TYPES):
        raise InputError(
            f"id column {id_col!r} has type {names[id_col].simpleString()}; use an integer or string column"
        )
    if not isinstance(names[text_col], (T.StringType, T.BinaryType)):
        raise InputError(
            f"text column {text_col!r} has type {names[text_col].simpleString()}, not string; set --text-col"
        )
    note_id = F.col(id_col)
    if id_type == "long" or (id_type == "auto" and not isinstance(names[id_col], T.StringType)):
        note_id = note_id.cast("long")
    elif id_type == "string":
        note_id = note_id.cast("string")
    return df.select(
        note_id.alias("note_id"),
        F.col(text_col).alias("text"),
        input_errors(df, text_col),
        *(F.col(k).cast("string").alias(k) for k in keep),
    )


def input_errors(df: DataFrame, text_col: str):
    """`input_error`: why a row read from the source is unusable, else null. CSV rows with the wrong field
    count, and text that opens with a quote it never closes (an unbalanced quote: the parser has swallowed
    the following lines, so the rows it ate cannot be told apart)."""
    from pyspark.sql import functions as F

    if CORRUPT not in df.columns:
        return F.lit(None).cast("string").alias("input_error")
    text = F.col(text_col)
    quotes = F.length(text) - F.length(F.regexp_replace(text, '"', ""))
    return (
        F.when(F.col(CORRUPT).isNotNull(), F.lit("malformed CSV row (wrong number of fields)"))
        .when(
            text.startswith('"') & (quotes % 2 == 1),
            F.lit("malformed CSV row (unbalanced quote; following lines were merged into it)"),
        )
        .alias("input_error")
    )
