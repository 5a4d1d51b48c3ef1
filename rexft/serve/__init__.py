"""``rexft serve``: a trained run behind an OpenAI-compatible endpoint.

    router    which adapter serves a request: the run's embedder and centroids (``Router``, ``Route``)
    protocol  OpenAI's request, response, stream and error bodies (pydantic)
    backend   what the endpoints ask of a backend: a ``Call`` in, typed events out (``Backend``)
    local     the local backend: the exact dynamic mixture on rexft's engine, concurrent requests batched
    vllm      the vLLM backend: merge-export's adapters as a vLLM server's LoRA modules (supervised or upstream)
    app       the FastAPI endpoints over one ``Service``
    stage     ``rexft serve`` itself
"""
