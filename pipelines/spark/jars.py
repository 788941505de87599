"""The JARs a Spark session needs beyond pyspark's own: Delta Lake's (`delta`) and hadoop-aws for `s3a://`
(`s3a`), with their coordinates derived from, and checked against, the installed pyspark and delta-spark.

    builder = jars.configure(SparkSession.builder.master("local[2]"), ("delta", "s3a"))
    python -m clinlong.pipelines.spark.jars [delta] [s3a]     # resolve once; print the jars for spark-submit --jars
    python -m clinlong.pipelines.spark.jars delta s3a --submit-args   # spark-submit's --jars and --conf options

They are resolved once per machine, the standard way first: Spark's own Ivy (`spark.jars.packages`, what
`delta.configure_spark_with_delta_pip(builder, extra_packages=[...])` sets) into its cache (`~/.ivy2.5.2`);
where Ivy cannot reach a registry, Maven (`mvn dependency:copy-dependencies`) into a local folder. The list
of resolved files is kept under `$CLINLONG_JARS` (default `~/.cache/clinlong/jars`), and sessions get it as
`spark.jars`: later starts resolve nothing and need no network. A JAR that cannot be resolved is a one-line
`JarError` naming the coordinates and what each resolver said; it is never skipped.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from urllib.parse import urlparse

from clinlong.pipelines.core.errors import JarError  # noqa: F401 - re-exported: defined in core.errors

SCALA = "2.13"
DELTA_EXTENSION = "io.delta.sql.DeltaSparkSessionExtension"
DELTA_CATALOG = "org.apache.spark.sql.delta.catalog.DeltaCatalog"
KINDS = ("delta", "s3a")
# What Delta's and hadoop-aws' dependency trees repeat of pyspark's own jars/ (hadoop-client, Parquet,
# Jackson, logging): Spark's copies are loaded first anyway, so resolving these again only costs downloads.
EXCLUDES = (
    "org.apache.hadoop:hadoop-client-api",
    "org.apache.hadoop:hadoop-client-runtime",
    "org.apache.parquet:parquet-hadoop",
    "org.apache.parquet:parquet-column",
    "org.apache.parquet:parquet-common",
    "org.apache.parquet:parquet-encoding",
    "org.apache.parquet:parquet-format-structures",
    "org.apache.parquet:parquet-jackson",
    "com.fasterxml.jackson.core:jackson-databind",
    "com.fasterxml.jackson.core:jackson-core",
    "com.fasterxml.jackson.core:jackson-annotations",
    "org.apache.logging.log4j:log4j-core",
    "org.apache.logging.log4j:log4j-api",
    "org.apache.logging.log4j:log4j-slf4j2-impl",
    "org.slf4j:slf4j-api",
    "org.xerial.snappy:snappy-java",
    "com.github.luben:zstd-jni",
    "org.scala-lang:scala-library",
)
MAVEN_CENTRAL = "https://repo1.maven.org/maven2"


def _pyspark_jars() -> Path:
    import pyspark

    return Path(pyspark.__file__).parent / "jars"


def _bundled(prefix: str) -> str:
    """The version of the jar `prefix-X.jar` that pyspark ships (e.g. hadoop-client-api -> 3.4.2)."""
    for f in sorted(_pyspark_jars().glob(f"{prefix}-*.jar")):
        m = re.fullmatch(rf"{re.escape(prefix)}-(\d[\w.\-]*)\.jar", f.name)
        if m:
            return m.group(1)
    raise JarError(
        f"pyspark's jars/ has no {prefix}-*.jar; is pyspark installed whole (pip install 'clinlong[spark]')?"
    )


def coordinates(kinds=KINDS) -> list[str]:
    """Maven coordinates for `kinds`: Delta's as configure_spark_with_delta_pip derives them from the installed
    delta-spark and pyspark (checked against the pyspark versions delta-spark declares), hadoop-aws at the
    Hadoop version pyspark bundles (it pulls the AWS SDK v2 bundle of that release)."""
    import pyspark

    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise JarError(f"unknown JAR kind(s) {sorted(unknown)}; choose from {', '.join(KINDS)}")
    spark = pyspark.__version__
    scala = ".".join(_bundled("scala-library").split(".")[:2])
    if scala != SCALA:
        raise JarError(f"pyspark {spark} is built on Scala {scala}; this project's JARs are for Scala {SCALA}")
    out = []
    if "delta" in kinds:
        try:
            delta = metadata.version("delta-spark")
        except metadata.PackageNotFoundError:
            raise JarError("delta-spark is not installed: pip install 'clinlong[delta]'") from None
        _check_requirement(delta, spark)
        out.append(f"io.delta:delta-spark_{'.'.join(spark.split('.')[:2])}_{SCALA}:{delta}")
    if "s3a" in kinds:
        out.append(f"org.apache.hadoop:hadoop-aws:{_bundled('hadoop-client-api')}")
    return out


def _check_requirement(delta: str, spark: str) -> None:
    """delta-spark declares the pyspark versions its JAR is built for; refuse any other in one line."""
    import operator

    ops = {
        ">=": operator.ge,
        "<=": operator.le,
        ">": operator.gt,
        "<": operator.lt,
        "==": operator.eq,
        "!=": operator.ne,
    }

    def version(v: str) -> tuple:
        return tuple(int(x) for x in re.findall(r"\d+", v)[:3])

    for req in metadata.requires("delta-spark") or []:
        m = re.match(r"^pyspark\s*([^;]*)", req)
        if not m:
            continue
        for spec in filter(None, (s.strip() for s in m.group(1).split(","))):
            op, want = re.match(r"(>=|<=|==|!=|>|<)\s*(.+)", spec).groups()
            if not ops[op](version(spark), version(want)):
                raise JarError(
                    f"delta-spark {delta} is built for pyspark {m.group(1).strip()}, not the installed "
                    f"{spark}; install the versions pyproject.toml pins (pip install -e '.[spark,delta]')"
                )


def cache_dir() -> Path:
    return Path(os.environ.get("CLINLONG_JARS") or Path.home() / ".cache" / "clinlong" / "jars")


def resolve(kinds=KINDS, quiet: bool = True) -> list[str]:
    """Local paths of the jars for `kinds` (transitive dependencies included), resolved on first use on this
    machine, under a lock (two processes starting together resolve once), then read from the cache."""
    coords = coordinates(kinds)
    key = hashlib.sha256(json.dumps([coords, EXCLUDES]).encode()).hexdigest()[:16]
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    manifest = root / f"{'+'.join(sorted(kinds))}-{key}.json"
    cached = _read_manifest(manifest)
    if cached:
        return cached
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        cached = _read_manifest(manifest)
        if cached:
            return cached
        failures = []
        for name, how in (("Spark's Ivy", _ivy), ("Maven", _maven)):
            try:
                paths = how(coords, root / f"maven-{key}", quiet)
            except Exception as e:  # noqa: BLE001 - try the next resolver, report both if neither works
                failures.append(f"{name}: {_first_line(e)}")
                continue
            manifest.write_text(
                json.dumps({"coordinates": coords, "excludes": EXCLUDES, "resolver": name, "jars": paths}, indent=1)
            )
            return paths
    raise JarError(
        f"cannot resolve {', '.join(coords)} ({'; '.join(failures)}); this needs Maven Central "
        f"({MAVEN_CENTRAL}) once per machine, or set CLINLONG_JARS to a folder resolved elsewhere"
    )


def _read_manifest(path: Path) -> list[str] | None:
    try:
        paths = json.loads(path.read_text())["jars"]
    except (OSError, ValueError, KeyError):
        return None
    return paths if paths and all(os.path.isfile(p) for p in paths) else None


def _ivy(coords: list[str], _folder: Path, quiet: bool) -> list[str]:
    """Spark's own resolution (`spark.jars.packages`, as spark-submit --packages does it) in a JVM started
    for that alone: the resolved files are the `spark.jars` the JVM was given."""
    from pyspark import SparkConf
    from pyspark.java_gateway import launch_gateway

    conf = SparkConf().set("spark.jars.packages", ",".join(coords)).set("spark.jars.excludes", ",".join(EXCLUDES))
    saved = os.dup(2)
    log = tempfile.TemporaryFile()
    if quiet:  # Ivy prints hundreds of lines; keep them for the error only
        os.dup2(log.fileno(), 2)
    try:
        gateway = launch_gateway(conf)
    except Exception as e:  # noqa: BLE001 - Ivy failed: its own last lines say why
        log.seek(0)
        lines = [
            ln.strip()
            for ln in log.read().decode(errors="replace").splitlines()
            if "unresolved dependency" in ln or "Exception" in ln
        ]
        raise JarError(lines[0] if lines else str(e)) from None
    finally:
        os.dup2(saved, 2)
        os.close(saved)
    try:
        jars = gateway.jvm.System.getProperty("spark.jars") or ""
    finally:
        gateway.shutdown()
        proc = getattr(gateway, "proc", None)
        if proc is not None:
            proc.stdin.close() if proc.stdin else None
            proc.wait(30)
    paths = [urlparse(j).path if j.startswith("file:") else j for j in jars.split(",") if j]
    if not paths:
        raise JarError("Ivy returned no jars")
    return paths


def _maven(coords: list[str], folder: Path, quiet: bool) -> list[str]:
    """`mvn dependency:copy-dependencies` of a throw-away pom into `folder` (Maven's own cache, ~/.m2)."""
    mvn = shutil.which("mvn")
    if mvn is None:
        raise JarError("mvn is not on PATH")
    deps = "".join(
        f"<dependency><groupId>{g}</groupId><artifactId>{a}</artifactId><version>{v}</version><exclusions>"
        + "".join(
            f"<exclusion><groupId>{eg}</groupId><artifactId>{ea}</artifactId></exclusion>"
            for eg, ea in (e.split(":") for e in EXCLUDES)
        )
        + "</exclusions></dependency>"
        for g, a, v in (c.split(":") for c in coords)
    )
    pom = (
        "<project xmlns='http://maven.apache.org/POM/4.0.0'><modelVersion>4.0.0</modelVersion>"
        "<groupId>clinlong</groupId><artifactId>jars</artifactId><version>0</version>"
        f"<dependencies>{deps}</dependencies></project>"
    )
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "pom.xml").write_text(pom)
    proc = subprocess.run(
        [
            mvn,
            "-B",
            "-q",
            "-f",
            str(tmp / "pom.xml"),
            "dependency:copy-dependencies",
            "-DincludeScope=runtime",
            f"-DoutputDirectory={tmp / 'jars'}",
        ],
        capture_output=True,
        text=True,
    )
    if proc.returncode:
        errors = [ln for ln in proc.stdout.splitlines() + proc.stderr.splitlines() if "ERROR" in ln]
        raise JarError(errors[0] if errors else f"mvn exited {proc.returncode}")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return sorted(str(p) for p in (folder / "jars").glob("*.jar"))


def _first_line(e) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


def configure(builder, kinds=KINDS):
    """`builder` with the jars of `kinds` (`spark.jars`, resolved once per machine) and, for Delta, its SQL
    extension and catalog. Raises JarError (one line) when they cannot be resolved."""
    kinds = tuple(k for k in KINDS if k in kinds)
    if not kinds:
        return builder
    builder = builder.config("spark.jars", ",".join(resolve(kinds)))
    if "delta" in kinds:
        builder = builder.config("spark.sql.extensions", DELTA_EXTENSION).config(
            "spark.sql.catalog.spark_catalog", DELTA_CATALOG
        )
    return builder


def job_kinds(writer: str, locations) -> tuple[str, ...]:
    """The JARs a job's own session (python -m, not spark-submit) adds: Delta's for `--writer delta-spark` or
    an output named as a catalog table, hadoop-aws where a location is `s3a://`. `--writer auto` without
    them stays on delta-rs, which needs no JAR (the embedded default)."""
    from clinlong.pipelines.core.storage import scheme

    kinds = []
    if writer == "delta-spark" or any(is_table_name(x) for x in list(locations)[1:]):
        kinds.append("delta")
    if any(scheme(x) == "s3a" for x in locations if x):
        kinds.append("s3a")
    return tuple(kinds)


def is_table_name(name: str) -> bool:
    """`db.table` or `catalog.schema.table` (not an existing local path): a table in Spark's catalog."""
    return (
        bool(name)
        and not os.path.exists(name)
        and re.fullmatch(r"(`[^`]+`|[A-Za-z_][\w$]*)(\.(`[^`]+`|[A-Za-z_][\w$]*)){1,2}", name) is not None
    )


def s3a_conf(endpoint: str | None = None) -> dict[str, str]:
    """Hadoop settings for `s3a://` from the standard AWS variables (AWS_ENDPOINT_URL: a custom endpoint,
    path-style access, TLS only for https); credentials are left to hadoop-aws' default provider chain,
    which reads AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY itself, so no secret enters Spark's conf."""
    endpoint = endpoint or os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3")
    conf = {}
    if endpoint:
        conf.update(
            {
                "spark.hadoop.fs.s3a.endpoint": endpoint,
                "spark.hadoop.fs.s3a.path.style.access": "true",
                "spark.hadoop.fs.s3a.connection.ssl.enabled": str(endpoint.startswith("https")).lower(),
            }
        )
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        conf["spark.hadoop.fs.s3a.endpoint.region"] = region
    return conf


def submit_args(kinds=KINDS, endpoint: str | None = None) -> list[str]:
    """spark-submit's options for `kinds`, as `configure` sets them on a builder: `--jars` (resolved once per
    machine), Delta's SQL extension and catalog (`--jars`/`--packages` alone put Delta's classes on the
    classpath, but MERGE INTO, DESCRIBE HISTORY and `delta.`path`` need the extension), and the fs.s3a settings
    of `s3a_conf` (from AWS_ENDPOINT_URL; credentials stay in the AWS_* variables)."""
    kinds = tuple(k for k in KINDS if k in kinds)
    if not kinds:
        return []
    out = ["--jars", ",".join(resolve(kinds))]
    conf = (
        {"spark.sql.extensions": DELTA_EXTENSION, "spark.sql.catalog.spark_catalog": DELTA_CATALOG}
        if "delta" in kinds
        else {}
    )
    conf.update(s3a_conf(endpoint) if "s3a" in kinds else {})
    for k, v in conf.items():
        out += ["--conf", f"{k}={v}"]
    return out


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    kinds = tuple(a for a in args if not a.startswith("-")) or KINDS
    try:
        if "--submit-args" in args:
            resolve(kinds, quiet="--verbose" not in args)
            print(" ".join(shlex.quote(a) for a in submit_args(kinds)))
            return 0
        paths = resolve(kinds, quiet="--verbose" not in args)
    except JarError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(",".join(paths))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
