"""MLflow: runs, metrics and artifacts of training (`runs`), and model sources and the registry (`registry`)."""
