"""Data: canonical corpora (`schema`, `shards`), converters and raw readers into them, and the Ray Data ingest
(`source` -> `ingest` -> `batches`, fronted by `dataset`)."""
