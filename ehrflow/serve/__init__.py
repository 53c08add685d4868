"""The Ray Serve application: HTTP API, durable job store, API keys, metrics and deployments."""
