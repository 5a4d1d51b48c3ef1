"""The ``rexft`` model for lm-evaluation-harness: HFLM over a run directory's base model and adapter, with
each request's prior set on the adapters before the forward that scores or continues it.

    request's context (loglikelihood, generate_until) or document (loglikelihood_rolling)
      -> the text ``rexft eval`` would embed for it: the context itself, or, with --apply_chat_template,
         the user turn inside the rendered chat (rexft embeds prompts without the template's boilerplate)
      -> prior = embed(text) @ centroids.T, (k,), from the run's embedder and centroids
         (``rexft.inference.adapter_priors``, as ``rexft eval`` computes priors for unseen tasks)
      -> set_prior(model, (b, k)) for the rows of each forward, then HFLM's own forward / generate()

HFLM batches requests its own way (longest first; one row for requests that share a context and a
one-token continuation; rolling windows). Each forward's rows are matched to their requests by token ids:
a loglikelihood row is its request's context + continuation tokens (the last max_length + 1, less the
last, right-padded), so the requests' encodings name every row before HFLM builds it. generate_until
encodes each batch's contexts right before generating them, so that batch's texts are the rows'.
Adapters without a prior (LoRA, MoDE, trex with use_prior=false) get none and run as HFLM does.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from rexft.adapters import ADAPTER_CONFIG, load_adapter, read_adapter_config, set_prior
from rexft.errors import RexftError
from rexft.formats import prompt_of_chat
from rexft.inference import adapter_priors
from rexft.modeling import default_device, load_model, load_tokenizer
from rexft.rundir import saved_config


@register_model("rexft")
class RexftLM(HFLM):
    """``--model rexft --model_args run_dir=DIR[,use_adapter=false][,batch_size=...]``; any other HFLM
    argument that applies to a model already loaded (batch_size, max_length, ...) passes through."""

    def __init__(self, run_dir: str, use_adapter: bool = True, device: str | None = None, **kwargs):
        self.run_config = saved_config(Path(run_dir))
        if device is None or device.startswith("cuda") and not torch.cuda.is_available():  # lm-eval's default is cuda
            device = default_device()
        self.adapter_dir = self.run_config.path / "adapter"
        if use_adapter and not (self.adapter_dir / ADAPTER_CONFIG).is_file():
            raise RexftError(f"no adapter at {self.adapter_dir}: run `rexft train` first, or pass "
                             "--model_args run_dir=...,use_adapter=false for the base model")
        tokenizer = load_tokenizer(self.run_config.model)
        model = load_model(self.run_config.model, len(tokenizer), device)
        self.adapter_config = None
        if use_adapter:
            load_adapter(model, self.adapter_dir)
            self.adapter_config = read_adapter_config(self.adapter_dir)
        super().__init__(pretrained=model.to(device).eval(), tokenizer=tokenizer, backend="causal", **kwargs)
        self.priors: dict[str, torch.Tensor] = {}  # by request text; empty when the adapter takes no prior
        self.uses_prior = self.adapter_config is not None  # until adapter_priors says otherwise
        self.row_texts: dict[tuple[int, ...], str] = {}  # loglikelihood rows (token ids) -> their request's text
        self.batch_texts: list[str] = []  # the contexts generate_until encoded last
        self.chat_prompts: dict[str, str] = {}  # rendered chat -> the prompt rexft embeds for it
        self.probing = False  # batch_size=auto: HFLM times forwards of made-up rows

    # ------------------------------------------------------------------------------------------ priors
    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        rendered = super().apply_chat_template(chat_history, add_generation_prompt)
        self.chat_prompts[rendered] = prompt_of_chat(chat_history)
        return rendered

    def note_priors(self, texts: list[str]) -> None:
        """The prior of every new text, in one embedding pass (embeddings are cached on disk as in eval)."""
        new = [t for t in dict.fromkeys(texts) if t not in self.priors]
        if not (self.uses_prior and new):
            return
        priors = adapter_priors(self.adapter_dir, self.adapter_config, [self.chat_prompts.get(t, t) for t in new],
                                self.run_config)
        if priors is None:
            self.uses_prior = False
            return
        self.priors.update(zip(new, priors))

    def set_row_priors(self, texts: list[str]) -> None:
        """Give the adapters one prior per row of the next forward."""
        if not self.uses_prior:
            set_prior(self.model, None)
            return
        if self.probing:
            prior = torch.zeros(len(texts), self.adapter_config["prior"]["k"])
        else:
            prior = torch.stack([self.priors[t] for t in texts])
        set_prior(self.model, prior.to(self.device))

    def row_text(self, row: list[int]) -> str:
        """The text of the request a right-padded loglikelihood row belongs to (HFLM pads with 0)."""
        key = tuple(row)
        while key not in self.row_texts and key and key[-1] == 0:
            key = key[:-1]
        if key not in self.row_texts:
            raise RexftError("rexft harness model: a forward row matches no request; cannot set its prior")
        return self.row_texts[key]

    def row_key(self, tokens: list[int]) -> tuple[int, ...]:
        """The row HFLM feeds for a request's context + continuation tokens."""
        return tuple(tokens[-(self.max_length + 1):][:-1])

    @contextmanager
    def any_prior(self):
        self.probing = True
        try:
            yield
        finally:
            self.probing = False

    # ------------------------------------------------------------------------- HFLM's request methods
    def loglikelihood(self, requests, disable_tqdm: bool = False):
        self.note_priors([request.args[0] for request in requests])
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        documents = [request.args[0] for request in requests]
        self.note_priors(documents)
        for document in documents:  # the windows HFLM will score, each a row of its document
            windows = get_rolling_token_windows(token_list=self.tok_encode(document), prefix_token=self.prefix_token_id,
                                                max_seq_len=self.max_length, context_len=1)
            for context, continuation in map(make_disjoint_window, windows):
                self.row_texts[self.row_key(context + continuation)] = document
        return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm)

    def generate_until(self, requests, disable_tqdm: bool = False):
        self.note_priors([request.args[0] for request in requests])
        return super().generate_until(requests, disable_tqdm=disable_tqdm)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        for strings, context_enc, continuation_enc in requests:
            if strings is not None:  # rolling windows carry None: loglikelihood_rolling named their rows
                self.row_texts[self.row_key(context_enc + continuation_enc)] = strings[0]
        return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)

    def _detect_batch_size(self, requests=None, pos: int = 0):
        with self.any_prior():
            return super()._detect_batch_size(requests, pos)

    # ------------------------------------------------------------------------------ the forward hooks
    def _model_call(self, inps: torch.Tensor, attn_mask=None, labels=None) -> torch.Tensor:
        self.set_row_priors([None] * len(inps) if self.probing else [self.row_text(row) for row in inps.tolist()])
        return super()._model_call(inps, attn_mask, labels)

    def tok_batch_encode(self, strings: list[str], padding_side: str = "left", left_truncate_len: int | None = None,
                         truncation: bool = False):
        self.batch_texts = list(strings)
        return super().tok_batch_encode(strings, padding_side, left_truncate_len, truncation)

    def _model_generate(self, context: torch.Tensor, max_length: int, stop: list[str], **generation_kwargs) -> torch.Tensor:
        if len(self.batch_texts) != context.shape[0]:
            raise RexftError("rexft harness model: generate() rows do not match the contexts encoded for them")
        self.set_row_priors(self.batch_texts)
        return super()._model_generate(context, max_length, stop, **generation_kwargs)
