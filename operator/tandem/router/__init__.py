"""Tandem's router: one OpenAI-compatible endpoint per InferenceService that decides, per request,
whether to split it into prefill and decode (vLLM's NIXL-connector protocol) or serve it on one
replica.

* `tandem.router.config` - the ConfigMap document (pools, endpoints, threshold, timeouts, limits)
* `tandem.router.decide` - the pure per-request decision and replica choice
* `tandem.router.tokens` - prompt-token counting (tokenizer when available, else bytes / 4)
* `tandem.router.replicas`, `tandem.router.discovery` - replicas from the config or EndpointSlices
* `tandem.router.server` - the aiohttp server (the proxy)
* `tandem.router.upstream` - its lean keep-alive HTTP/1.1 client to the replicas
* `tandem.router.metrics` - Prometheus metrics
* `tandem.router.main` - the ``tandem-router`` entry point; `tandem.router.bench` - the overhead bench
"""
