"""`hetrun serve`: an OpenAI-compatible HTTP server over one heterogeneous deployment, with continuous batching.

  loading.py     MODEL (a built-in model, a model directory or a bundle) deployed, with its tokenizer
  builtin.py     the built-in tiny models: tokenizer and weights trained in seconds on training_text.txt, cached
  engine.py      transformers' continuous-batching manager over the deployed model, supervised (admission,
                 cancel, restart after a failed step)
  sampling.py    per-request temperature, top_p and seed inside the batched steps
  textstream.py  token ids to text as they arrive; stop strings
  schemas.py     OpenAI's request bodies (strict), error body and response objects
  app.py         the FastAPI app: /v1/models, /v1/completions, /v1/chat/completions, /health, /metrics
  metrics.py     the Prometheus metrics
  server.py      uvicorn: bind, serve, drain on SIGTERM
"""
