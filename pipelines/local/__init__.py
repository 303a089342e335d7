"""Local services on loopback for the demo, the tests and the benches: an S3 server (`s3`), a Ray head and an
MLflow server (`services`)."""
