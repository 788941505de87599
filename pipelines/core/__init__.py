"""The core, no Spark: text rules, windows, engine, runtime, artifact reader, the one model definition,
output schemas, Parquet files, storage URIs, job configuration, logging, failpoints."""
