"""Online inference over HTTP with Ray Serve: `app` (the application builder), `api` (FastAPI ingress),
`model` (batched model deployment), `config` (ServeConfig), `schemas` (request and response shapes)."""
