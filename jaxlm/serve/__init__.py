"""Serving: an OpenAI-compatible HTTP server over a jaxlm.inference.service.Service.

`app.py` is the HTTP layer only (FastAPI): the OpenAI wire format of /v1/completions,
/v1/models and /v1/classify, lm-evaluation-harness's tokenizer endpoints, /health and
/metrics. The model, its tokenizer and the batching engine live in jaxlm.inference.
"""
