"""A teacher behind an OpenAI-compatible completions server that returns top-k log-probs of the prompt (vLLM's
`prompt_logprobs`, SGLang's equivalent): `build_cache(ServedTeacher(url, model, vocab_size=V), data, ...)`.

Per sequence of n tokens one request asks for `prompt_logprobs = k` (the distribution of token i given the
tokens before it, i >= 1) and one generated token with `logprobs = k` (the distribution after the last
token), with token ids as keys (`return_tokens_as_token_ids`). Position i of the cache is the teacher's
distribution of the token after i, so it is prompt entry i + 1 for i < n - 1 and the generated token's
entry for i = n - 1. Server log-probs are of the model's raw distribution: only temperature 1 can be stored
exactly (a tempered log-softmax needs the full vocabulary), and no log-sum-exp.
"""
from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import List, Sequence, Tuple

import numpy as np

from ._format import CacheError, _p


class ServedTeacher:
    """url: the server's base URL (e.g. http://localhost:8000/v1); model: the served model name; vocab_size:
    the teacher's vocabulary size (checked against every returned id). batch_size: sequences per request;
    retries: attempts per request on connection errors and 5xx answers (exponential back-off from
    `backoff` seconds); timeout: seconds per request."""

    def __init__(self, url: str, model: str, *, vocab_size: int, batch_size: int = 8, retries: int = 3,
                 backoff: float = 0.5, timeout: float = 120.0, api_key: str = ""):
        self.url = url.rstrip("/") + "/completions"
        self.model, self.vocab_size = model, int(vocab_size)
        self.batch_size, self.retries, self.backoff, self.timeout = int(batch_size), int(retries), backoff, timeout
        self.api_key = api_key

    def __repr__(self):
        return f"ServedTeacher({self.url!r}, model={self.model!r}, vocab_size={self.vocab_size})"

    def _post(self, body: dict) -> dict:
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last = None
        for attempt in range(self.retries + 1):
            try:
                req = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
                with urllib.request.urlopen(req, timeout=self.timeout) as r:
                    return json.loads(r.read())
            except urllib.error.HTTPError as e:
                if e.code < 500:  # the request is wrong: retrying will not help
                    raise CacheError(_p(f"the teacher server {self.url} refused the request: HTTP {e.code} "
                                        f"{e.read().decode(errors='replace')[:300]}")) from None
                last = f"HTTP {e.code}"
            except (urllib.error.URLError, OSError, ValueError) as e:
                last = f"{type(e).__name__}: {e}"
            if attempt < self.retries:
                time.sleep(self.backoff * 2 ** attempt)
        raise CacheError(_p(f"the teacher server {self.url} did not answer after {self.retries + 1} attempts "
                            f"(last: {last})"))

    def _entries(self, d, k: int, where: str) -> Tuple[np.ndarray, np.ndarray]:
        """The k most likely (id, log-prob) of one position's dict, sorted by decreasing log-prob."""
        if not d:
            raise CacheError(_p(f"the teacher server returned no log-probs for {where}"))
        items = []
        for key, val in d.items():
            lp = val["logprob"] if isinstance(val, dict) else val
            tok = key[len("token_id:"):] if isinstance(key, str) and key.startswith("token_id:") else key
            try:
                tid = int(tok)
            except ValueError:
                raise CacheError(_p(f"the teacher server keys log-probs by token text ({key!r}), not ids: start it "
                                    "so that it accepts return_tokens_as_token_ids (vLLM >= 0.5)")) from None
            if not 0 <= tid < self.vocab_size:
                raise CacheError(_p(f"the teacher server returned token id {tid} outside the vocabulary [0, "
                                    f"{self.vocab_size}) at {where}: is vocab_size that of the served model?"))
            items.append((float(lp), tid))
        items.sort(key=lambda t: (-t[0], t[1]))
        if len(items) < k:
            raise CacheError(_p(f"the teacher server returned {len(items)} log-probs at {where}, fewer than k = {k}: "
                                "raise the server's limit (vLLM: --max-logprobs)"))
        vals = np.array([v for v, _ in items[:k]], np.float32)
        ids = np.array([t for _, t in items[:k]], np.int32)
        return vals, ids

    def topk_logprobs(self, sequences: Sequence[Sequence[int]], k: int) -> List[Tuple[np.ndarray, np.ndarray]]:
        """Per sequence of n tokens: (values (n, k) float32 log-probs, ids (n, k) int32), row i the teacher's
        distribution of the token after token i, sorted by decreasing log-prob."""
        out = []
        for lo in range(0, len(sequences), self.batch_size):
            batch = [[int(t) for t in s] for s in sequences[lo:lo + self.batch_size]]
            body = {"model": self.model, "prompt": batch, "max_tokens": 1, "temperature": 1.0, "logprobs": k,
                    "prompt_logprobs": k, "return_tokens_as_token_ids": True, "echo": False}
            resp = self._post(body)
            choices = sorted(resp.get("choices", []), key=lambda c: c.get("index", 0))
            if len(choices) != len(batch):
                raise CacheError(_p(f"the teacher server answered {len(choices)} choices for {len(batch)} prompts"))
            for seq, ch in zip(batch, choices):
                n = len(seq)
                prompt = ch.get("prompt_logprobs")
                last = (ch.get("logprobs") or {}).get("top_logprobs") or []
                if prompt is None or len(prompt) != n or not last:
                    raise CacheError(_p("the teacher server did not return prompt_logprobs for every prompt token and "
                                        "the next token's logprobs (an OpenAI-compatible server with vLLM's "
                                        "prompt_logprobs is needed)"))
                rows = [self._entries(prompt[i + 1], k, f"prompt token {i + 1}") for i in range(n - 1)]
                rows.append(self._entries(last[0], k, "the generated token"))
                out.append((np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows])))
        return out
